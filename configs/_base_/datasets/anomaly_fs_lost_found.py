# Fishyscapes Lost & Found validation (100 images).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='FishyscapesLostFoundDataset',
                 data_root='data/anomaly/FS_LostFound_full'))
test_evaluator = dict(track='obstacle')
# Split name printed in tools/eval_anomaly.py's tables.
dataset_split = 'val'
