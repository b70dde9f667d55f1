# SegmentMeIfYouCan RoadAnomaly21 validation (10 images), common images/ + labels_masks/ layout.
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='RoadAnomaly21Dataset',
                 data_root='data/anomaly/RoadAnomaly21'))
# Split name printed in tools/eval_anomaly.py's tables.
dataset_split = 'validation'
# Folder of these frames in a SegmentMeIfYouCan submission (tools/eval_anomaly.py
# --smiyc-submission): the benchmark's name for the split.
smiyc_submission_name = 'AnomalyTrack-all'
