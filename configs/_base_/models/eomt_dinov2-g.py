# EoMT on DINOv2-reg4 ViT-g/16 (SwiGLU MLP): 40 blocks, queries before the last 5.
_base_ = ['./eomt_dinov2-b.py']
model = dict(backbone=dict(arch='g'), decoder=dict(num_blocks=5))
