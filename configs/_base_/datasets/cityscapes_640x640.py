# Cityscapes at 640x640 training crops (the LoRA fine-tuning experiment's size): the 1024 recipe
# with the crop, and therefore the scale jitter and the validation size, scaled to 640.
_base_ = ['./cityscapes_1024x1024.py']

crop_size = (640, 640)
# Short side at the crop size: 1280x640, covered by 2 windows of 640.
test_scale = (1280, 640)

train_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='LoadAnnotationsChecked', num_classes=19),
    # Fit into crop_size * s, s ~ U(0.5, 2): a 2048x1024 frame becomes (640 s)x(320 s).
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='Resize', scale=test_scale, keep_ratio=True),
    dict(type='LoadAnnotationsChecked', num_classes=19),
    dict(type='PackSegInputs'),
]

train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
