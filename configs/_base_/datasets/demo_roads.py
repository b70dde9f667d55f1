# The built-in demo data set: synthetic road scenes in Cityscapes layout (19 classes, 255 =
# ignore) rendered by `python tools/make_demo_data.py` into data/demo (48 train, 12 val images of
# 128x256, plus a 12-image anomaly split). Not real data: it only shows that the pipeline works.
dataset_type = 'CityscapesDataset'  # reads the layout as it is (suffixes are Cityscapes')
data_root = 'data/demo'
# Quoted by tools/train.py / test.py when the data folder is missing.
data_preparation = ('render it with `python tools/make_demo_data.py` (writes data/demo in a few '
                    'seconds; `--out DIR` for another folder)')
crop_size = (128, 128)
img_scale = (256, 128)  # (w, h) of the generated frames

train_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='LoadAnnotationsChecked', num_classes=19),
    # The reference recipe's jitter, (0.5, 2.0) around a crop-sized fit, would shrink these small
    # frames to 64x128; a milder jitter around the native size lets a tiny model learn in a few
    # hundred CPU iterations.
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotationsChecked', num_classes=19),
    dict(type='PackSegInputs'),
]

# Workers would cost more than they save for 128x256 PNGs on a small CPU machine.
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# The held-out anomaly split has its own config: anomaly_demo_roads.py (tools/eval_anomaly.py).
