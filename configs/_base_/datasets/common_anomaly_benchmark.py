# Shared by the anomaly benchmark configs (anomaly_<name>.py), which only name their dataset
# class, folder and SegmentMeIfYouCan track. Evaluation only: anomaly scores are compared at
# label resolution and pooled over the whole dataset.
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
# Images-only splits (the test server's frames, labels hidden: the anomaly_*_test.py configs,
# datasets with labelled=False): the same loading and resize, no annotations.
test_unlabelled_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(pipeline=test_pipeline))
# The model's test_cfg must request the same scores (tools/eval_anomaly.py sets both).
# protocol: 'exact' (all labelled pixels pooled, scikit-learn's definitions: research papers'
# numbers) and/or 'smiyc' (the SegmentMeIfYouCan evaluator: the leaderboard's numbers), e.g.
# protocol=['exact', 'smiyc'] for both from one inference. Frames are spilled to a temporary
# folder (spill_dir=None: the system's) until the evaluation ends, so memory stays bounded.
test_evaluator = dict(
    type='AnomalyMetric', score_names=['msp', 'maxlogit', 'rba'], track='anomaly',
    protocol='exact', spill_dir=None)
