# Cityscapes semantic segmentation, 1024x1024 training crops: the EoMT reference recipe
# (tue-mps/eomt, its Cityscapes semantic config). Data:
# data/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/ with
# *_gtFine_labelTrainIds.png made by tools/prepare_cityscapes.py.
#
# The model's SegDataPreProcessor must pad batches to `crop_size` (size=crop_size,
# seg_pad_val=255): scaled-down frames are smaller than the crop, as in the reference, which
# pads instead of upscaling.
dataset_type = 'CityscapesDataset'
data_root = 'data/cityscapes/'
# Quoted by tools/train.py / test.py when the data folder is missing.
data_preparation = ('download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from '
                    'https://www.cityscapes-dataset.com into data/cityscapes, then run '
                    '`python tools/prepare_cityscapes.py data/cityscapes` (README "Data preparation")')
crop_size = (1024, 1024)
# Validation keeps the short side at the crop size (2048x1024 = the original frame here); the
# model's sliding window covers the long side (2 windows at 1024).
test_scale = (2048, 1024)

train_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='LoadAnnotationsChecked', num_classes=19),
    # Reference scale jitter (torchvision ScaleJitter(target_size=crop, scale_range=(0.5, 2))):
    # fit the frame into crop_size * s, s ~ U(0.5, 2). mmcv's RandomResize with
    # scale=crop_size and keep_ratio=True computes the same factor, min(crop*s/h, crop*s/w),
    # so a 2048x1024 frame becomes (1024 s)x(512 s).
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.5, 2.0), keep_ratio=True),
    # No cat_max_ratio: the reference crops uniformly (it only re-draws crops with no labelled
    # pixel at all, which cannot happen on Cityscapes at this size).
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    # mmseg's defaults are the reference colour jitter: brightness +-32, contrast and
    # saturation x[0.5, 1.5], hue +-18 degrees, each with probability 0.5, random order.
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='Resize', scale=test_scale, keep_ratio=True),
    # Labels are loaded after the resize so that metrics are computed at full resolution.
    dict(type='LoadAnnotationsChecked', num_classes=19),
    dict(type='PackSegInputs'),
]

train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
