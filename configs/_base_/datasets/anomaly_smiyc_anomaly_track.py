# SegmentMeIfYouCan Anomaly Track as downloaded (validation images only; test labels are hidden).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='SMIYCDataset',
                 data_root='data/anomaly/dataset_AnomalyTrack'))
# Split name printed in tools/eval_anomaly.py's tables.
dataset_split = 'validation'
# Folder of these frames in a SegmentMeIfYouCan submission (tools/eval_anomaly.py
# --smiyc-submission): the benchmark's name for the split.
smiyc_submission_name = 'AnomalyTrack-all'
