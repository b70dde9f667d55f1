# LostAndFound test split (1203 frames), leftImg8bit + gtCoarse labelIds (0 -> 255, 1 -> 0, 2..200 -> 1).
# Evaluation only; anomaly scores are compared at label resolution, pooled over the dataset.
dataset_type = 'LostAndFoundDataset'
data_root = 'data/anomaly/LostAndFound'

test_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    # Same short-side-1024 resize as mmseg's Cityscapes test pipeline; the model's predict
    # brings the scores back to the original (label) resolution.
    dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
    dict(type='LoadAnnotationsChecked'),
    # Raw label ids -> 0 inlier / 1 anomaly / 255 void (the dataset provides the table).
    dict(type='RemapAnomalyLabels'),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='test', pipeline=test_pipeline))
# The model's test_cfg must request the same scores: anomaly_scores=['msp', 'maxlogit', 'rba'].
test_evaluator = dict(
    type='AnomalyMetric', score_names=['msp', 'maxlogit', 'rba'], track='obstacle')
