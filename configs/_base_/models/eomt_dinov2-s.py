# EoMT on DINOv2-reg4 ViT-S/16: 12 blocks, queries before the last 3.
_base_ = ['./eomt_dinov2-b.py']
model = dict(backbone=dict(arch='s'), decoder=dict(num_blocks=3))
