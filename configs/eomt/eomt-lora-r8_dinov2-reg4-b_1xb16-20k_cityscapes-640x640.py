# The LoRA fine-tuning experiment: EoMT, DINOv2-reg4 ViT-B/16 at 640, Cityscapes, LoRA rank 8 /
# alpha 16 / dropout 0.1 on qkv, proj, fc1, fc2 with the pretrained backbone frozen.
#
# | what            | value                                                                  |
# |-----------------|------------------------------------------------------------------------|
# | model           | EoMT, DINOv2-reg4 ViT-B/16, 100 queries in the last 3 blocks           |
# | data            | Cityscapes train, 640x640 crops, scale jitter (0.5, 2.0), flip, colour |
# | schedule        | 19,902 iterations, batch 16, AdamW 1e-4, layer decay 0.8, poly 0.9     |
# | adapters        | LoRA r=8, alpha=16, dropout 0.1 on qkv / proj / fc1 / fc2             |
# | trainable       | LoRA, backbone norms, queries, heads, upscaler                         |
# | evaluation      | sliding 640 windows (short side 640), mIoU                             |
_base_ = [
    '../_base_/models/eomt_dinov2-b.py',
    '../_base_/datasets/cityscapes_640x640.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/eomt_cityscapes_20k.py',
]
crop_size = (640, 640)
# Made by tools/convert_weights.py from Meta's dinov2_vitb14_reg4_pretrain.pth (README).
pretrained = 'checkpoints/dinov2_vitb14_reg4_p16.pth'

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        img_size=crop_size[0],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    test_cfg=dict(mode='slide', crop_size=crop_size[0]),
    lora_config=dict(
        enabled=True,
        rank=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=['qkv', 'proj', 'fc1', 'fc2'],
        freeze_base_model=True))
train_dataloader = dict(batch_size=16)
