# EoMT on a DINOv3 ViT-S/16: 12 blocks, queries before the last 3 (the reference's DINOv3
# EoMT-S, tue-mps/eomt configs/dinov3/coco/panoptic/eomt_small_640_2x.yaml).
# Pretrained weights, converted once (README "Pretrained weights"):
#   python tools/convert_weights.py dinov3_vits16_pretrain_lvd1689m-08c60483.pth \
#       checkpoints/dinov3_vits16_lvd1689m.pth --format meta-dinov3 --arch s
_base_ = ['./eomt_dinov3-b.py']
model = dict(backbone=dict(arch='s'))
