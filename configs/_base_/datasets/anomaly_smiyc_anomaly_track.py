# SegmentMeIfYouCan Anomaly Track as downloaded (validation images only; test labels are hidden).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='SMIYCDataset',
                 data_root='data/anomaly/dataset_AnomalyTrack'))
