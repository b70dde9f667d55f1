# Reference recipe: EoMT-L, Cityscapes 1024 (paper: 84.2 mIoU), full fine-tuning.
_base_ = [
    '../_base_/models/eomt_dinov2-l.py',
    '../_base_/datasets/cityscapes_1024x1024.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/eomt_cityscapes_20k.py',
]
crop_size = (1024, 1024)
# Made by tools/convert_weights.py from Meta's dinov2_vitl14_reg4_pretrain.pth (README).
pretrained = 'checkpoints/dinov2_vitl14_reg4_p16.pth'
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        img_size=crop_size[0],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    test_cfg=dict(mode='slide', crop_size=crop_size[0]))
train_dataloader = dict(batch_size=16)
