# SegmentMeIfYouCan Anomaly Track test frames as downloaded (dataset_AnomalyTrack, every image not
# named validation*; labels hidden): images only, no metrics. tools/eval_anomaly.py
# --smiyc-submission DIR writes their test-server files; with smiyc_anomaly_track (the labelled
# validation frames) in the same run the folder holds the benchmark's whole AnomalyTrack-all.
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='SMIYCDataset',
                 data_root='data/anomaly/dataset_AnomalyTrack',
                 split='test',
                 # The benchmark reads this track's images as .jpg and expects 110 frames in
                 # AnomalyTrack-all, 10 of them validation (SegmentMeIfYouCan/
                 # road-anomaly-benchmark, road_anomaly_benchmark/datasets/tracks.py).
                 img_suffixes=['.jpg'],
                 expected_frames=100,
                 pipeline={{_base_.test_unlabelled_pipeline}}))
# Split name printed by tools/eval_anomaly.py.
dataset_split = 'test'
# Folder of these frames in a SegmentMeIfYouCan submission (tools/eval_anomaly.py
# --smiyc-submission): the benchmark's name for the split.
smiyc_submission_name = 'AnomalyTrack-all'
