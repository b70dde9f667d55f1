# Reference recipe: EoMT-L, ADE20K semantic 512 (paper: 58.4 mIoU), full fine-tuning.
_base_ = [
    '../_base_/models/eomt_dinov2-l.py',
    '../_base_/datasets/ade20k_512x512.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/eomt_ade20k_40k.py',
]
crop_size = (512, 512)
pretrained = 'checkpoints/dinov2_vitl14_reg4_p16.pth'
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        img_size=crop_size[0],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decoder=dict(num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size[0]))
train_dataloader = dict(batch_size=16)
