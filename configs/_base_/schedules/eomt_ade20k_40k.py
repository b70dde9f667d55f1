# The reference ADE20K semantic recipe: 31 epochs at a total batch of 16 = 39,120 iterations
# (its annealing windows, start [6520, 13040, 19560, 26080], end [13040, ..., 32600], are what
# MaskAnnealingHook derives for 4 blocks). Same optimiser and warm-up as Cityscapes.
_base_ = ['./eomt_cityscapes_20k.py']
max_iters = 39120
param_scheduler = [
    dict(type='TwoStageWarmupPolyLR', warmup_iters=(500, 1000), power=0.9,
         begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
