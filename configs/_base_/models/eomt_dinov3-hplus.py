# EoMT on a DINOv3 ViT-H+/16 (32 blocks, width 1280, SwiGLU FFN). The reference publishes no
# EoMT on it; the queries enter before the last 5 blocks, as for the reference's deepest
# EoMT (ViT-g, 40 blocks).
# Pretrained weights, converted once (README "Pretrained weights"):
#   python tools/convert_weights.py dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth \
#       checkpoints/dinov3_vith16plus_lvd1689m.pth --format meta-dinov3 --arch h+
_base_ = ['./eomt_dinov3-b.py']
model = dict(backbone=dict(arch='h+'), decoder=dict(num_blocks=5))
