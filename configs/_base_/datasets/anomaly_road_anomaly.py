# Road Anomaly (Lis et al., 60 images; anomaly stored as 2 -> 1).
_base_ = ['./common_anomaly_benchmark.py']
test_dataloader = dict(
    dataset=dict(type='RoadAnomalyDataset',
                 data_root='data/anomaly/RoadAnomaly'))
# Split name printed in tools/eval_anomaly.py's tables.
dataset_split = 'all'
