# Reference recipe: EoMT-L on DINOv3 ViT-L/16, ADE20K semantic 512, full fine-tuning
# (tue-mps/eomt configs/dinov3/ade20k/semantic/eomt_large_512.yaml; its model zoo,
# model_zoo/dinov3.md: 59.5 mIoU). Schedule and effective learning rates:
# ../_base_/schedules/eomt_dinov3_ade20k_20k.py (every parameter at lr 2e-4).
_base_ = [
    '../_base_/models/eomt_dinov3-l.py',
    '../_base_/datasets/ade20k_512x512.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/eomt_dinov3_ade20k_20k.py',
]
crop_size = (512, 512)
# Made by tools/convert_weights.py from Meta's dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth
# (README "Pretrained weights"); the reference starts from the same LVD-1689M ViT-L.
pretrained = 'checkpoints/dinov3_vitl16_lvd1689m.pth'
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        img_size=crop_size[0],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decoder=dict(num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size[0]))
train_dataloader = dict(batch_size=16)
