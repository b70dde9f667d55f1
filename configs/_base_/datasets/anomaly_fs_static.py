# Fishyscapes Static validation (30 images).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='FishyscapesStaticDataset',
                 data_root='data/anomaly/fs_static'))
# Split name printed in tools/eval_anomaly.py's tables.
dataset_split = 'val'
