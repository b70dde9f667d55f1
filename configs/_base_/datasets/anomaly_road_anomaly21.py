# SegmentMeIfYouCan RoadAnomaly21 validation (10 images), common images/ + labels_masks/ layout.
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='RoadAnomaly21Dataset',
                 data_root='data/anomaly/RoadAnomaly21'))
