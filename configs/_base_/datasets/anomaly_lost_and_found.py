# LostAndFound test split (1203 frames): leftImg8bit + gtCoarse labelIds
# (0 -> 255 void, 1 -> 0 road, 2..200 -> 1 obstacle).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='LostAndFoundDataset',
                 data_root='data/anomaly/LostAndFound',
                 split='test'))
test_evaluator = dict(track='obstacle')
