# SegmentMeIfYouCan Obstacle Track frames as downloaded (dataset_ObstacleTrack), read images-only:
# no metrics; tools/eval_anomaly.py --smiyc-submission DIR writes their test-server files. These
# are the benchmark's ObstacleTrack-all, every frame the server expects (452): ObstacleTrack-test
# (327 frames, the leaderboard's split), ObstacleTrack-night (30), ObstacleTrack-snowstorm (55)
# and the 40 frames of the 'validation' scene (SegmentMeIfYouCan/road-anomaly-benchmark,
# road_anomaly_benchmark/datasets/tracks.py, DatasetObstacleTrack). Validation metrics come from
# the labelled `road_obstacle21` config; do not run it in the same submission run (its 30 frames
# are in this set too, and a frame written twice is refused).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='SMIYCDataset',
                 data_root='data/anomaly/dataset_ObstacleTrack',
                 split='test',
                 # The benchmark's scenes (DatasetObstacleTrack.SCENES_ALL);
                 # a frame's scene is its name up to the first '_'. Images are read as .webp.
                 scenes=['curvy-street', 'one-way-street', 'gravel', 'greyasphalt', 'motorway',
                         'paving', 'darkasphalt', 'darkasphalt2', 'snowstorm1', 'snowstorm2',
                         'driveway', 'validation'],
                 img_suffixes=['.webp'],
                 expected_frames=452,
                 pipeline={{_base_.test_unlabelled_pipeline}}))
test_evaluator = dict(track='obstacle')
# Split name printed by tools/eval_anomaly.py.
dataset_split = 'test'
# Folder of these frames in a SegmentMeIfYouCan submission (tools/eval_anomaly.py
# --smiyc-submission): the benchmark's name for the split.
smiyc_submission_name = 'ObstacleTrack-all'
