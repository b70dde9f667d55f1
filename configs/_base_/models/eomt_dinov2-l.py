# EoMT on DINOv2-reg4 ViT-L/16: 24 blocks, queries before the last 4.
_base_ = ['./eomt_dinov2-b.py']
model = dict(backbone=dict(arch='l'), decoder=dict(num_blocks=4))
