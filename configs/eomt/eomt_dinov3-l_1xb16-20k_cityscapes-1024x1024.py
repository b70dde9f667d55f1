# EoMT-L on DINOv3 ViT-L/16, Cityscapes 1024, full fine-tuning. The reference publishes no
# Cityscapes DINOv3 checkpoint or config: this recipe is carried over unchanged from the DINOv2
# one (eomt_dinov2-reg4-l_1xb16-20k_cityscapes-1024x1024.py, tue-mps/eomt
# configs/dinov2/cityscapes/semantic/eomt_large_1024.yaml): 19,902 iterations at batch 16,
# AdamW 1e-4, layer-wise lr decay 0.8 (block i: 1e-4 * 0.8 ** (23 - i), the embeddings as
# block 0, final norm and heads 1e-4), poly 0.9 with the two-stage warm-up (500, 1000),
# annealing windows derived from the length. Only the backbone differs. Untested at full scale.
_base_ = [
    '../_base_/models/eomt_dinov3-l.py',
    '../_base_/datasets/cityscapes_1024x1024.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/eomt_cityscapes_20k.py',
]
crop_size = (1024, 1024)
# Made by tools/convert_weights.py from Meta's dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth
# (README "Pretrained weights").
pretrained = 'checkpoints/dinov3_vitl16_lvd1689m.pth'
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        img_size=crop_size[0],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    test_cfg=dict(mode='slide', crop_size=crop_size[0]))
train_dataloader = dict(batch_size=16)
