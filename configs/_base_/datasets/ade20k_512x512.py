# ADE20K semantic segmentation (150 classes), 512x512 training crops: the EoMT reference
# recipe. Data: data/ade/ADEChallengeData2016/{images,annotations}/{training,validation}/, the
# layout of the official ADEChallengeData2016.zip, read by mmseg as it is.
dataset_type = 'ADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
# Quoted by tools/train.py / test.py when the data folder is missing.
data_preparation = ('unzip ADEChallengeData2016.zip into data/ade (README "Data preparation", '
                    'ADE20K)')
crop_size = (512, 512)
# Validation: short side at the crop size; the model's sliding window covers the long side.
test_scale = (2048, 512)

train_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    # The dataset's reduce_zero_label: label 0 ("other") -> 255 (ignore), 1..150 -> 0..149.
    dict(type='LoadAnnotationsChecked', num_classes=150),
    # Reference scale jitter: fit into crop_size * s, s ~ U(0.5, 2) (long side = 512 s).
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='Resize', scale=test_scale, keep_ratio=True),
    dict(type='LoadAnnotationsChecked', num_classes=150),
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
        reduce_zero_label=True,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        reduce_zero_label=True,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
