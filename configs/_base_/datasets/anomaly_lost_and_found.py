# LostAndFound test split (1203 frames): leftImg8bit + gtCoarse labelIds
# (0 -> 255 void, 1 -> 0 road, 2..200 -> 1 obstacle).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='LostAndFoundDataset',
                 data_root='data/anomaly/LostAndFound',
                 split='test'))
test_evaluator = dict(track='obstacle')
# Split name printed in tools/eval_anomaly.py's tables.
dataset_split = 'test'
# Folder of these frames in a SegmentMeIfYouCan submission (tools/eval_anomaly.py
# --smiyc-submission): the benchmark's name for the split.
smiyc_submission_name = 'LostAndFound-test'
