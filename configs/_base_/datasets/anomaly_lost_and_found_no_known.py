# LostAndFound-testNoKnown, the SegmentMeIfYouCan benchmark's obstacle-track evaluation split of
# LostAndFound: 1043 of the 1203 test frames, without the 17 whose labels are empty and the
# sequences with children or bicycles (SegmentMeIfYouCan/road-anomaly-benchmark,
# road_anomaly_benchmark/datasets/tracks.py). Needs the whole test split in the folder.
# The test server takes the whole LostAndFound-test (config lost_and_found) and selects this
# subset itself, so this config sets no smiyc_submission_name.
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='LostAndFoundDataset',
                 data_root='data/anomaly/LostAndFound',
                 subset='LostAndFound-testNoKnown'))
test_evaluator = dict(track='obstacle')
# Split name printed by tools/eval_anomaly.py.
dataset_split = 'testNoKnown'
