# EoMT on a DINOv3 ViT-L/16: 24 blocks, queries before the last 4 (the reference's DINOv3
# EoMT-L, tue-mps/eomt configs/dinov3/*/eomt_large_*.yaml, as with DINOv2).
# Pretrained weights, converted once (README "Pretrained weights"):
#   python tools/convert_weights.py dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth \
#       checkpoints/dinov3_vitl16_lvd1689m.pth --format meta-dinov3 --arch l
_base_ = ['./eomt_dinov3-b.py']
model = dict(backbone=dict(arch='l'), decoder=dict(num_blocks=4))
