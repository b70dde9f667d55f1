# SegmentMeIfYouCan RoadObstacle21 validation (30 images; folder name RoadObsticle21 as distributed).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='RoadObstacle21Dataset',
                 data_root='data/anomaly/RoadObsticle21'))
test_evaluator = dict(track='obstacle')
# Split name printed in tools/eval_anomaly.py's tables.
dataset_split = 'validation'
# Folder of these frames in a SegmentMeIfYouCan submission (tools/eval_anomaly.py
# --smiyc-submission): the benchmark's name for the split.
smiyc_submission_name = 'ObstacleTrack-all'
