# The built-in demo's held-out anomaly split (tools/make_demo_data.py): 12 synthetic 128x256
# frames with objects of no Cityscapes class on the road, in the common benchmark layout
# (images/ + labels_masks/: 0 inlier, 1 anomaly, 255 void).
dataset_type = 'AnomalyFolderDataset'
data_root = 'data/demo/anomaly'

test_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='LoadAnnotationsChecked'),
    dict(type='RemapAnomalyLabels'),  # checks that only 0 / 1 / 255 occur
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images', seg_map_path='labels_masks'),
        pipeline=test_pipeline))
# Pixel metrics only: SegmentMeIfYouCan's component size filters (500 / 100 px) are meant for
# 2048x1024 frames and would discard most components of these small images.
test_evaluator = dict(type='AnomalyMetric', score_names=['msp', 'maxlogit', 'rba'])
# Split name printed in tools/eval_anomaly.py's tables.
dataset_split = 'held-out'
