# The reference Cityscapes recipe (tue-mps/eomt, its Cityscapes semantic EoMT-L 1024 config):
# 107 epochs of 2,975 images at a total batch of 16 = 19,902 iterations. AdamW 1e-4, weight decay
# 0.05, layer-wise lr decay 0.8, gradient clipping at norm 0.01, poly(0.9) with the two-stage
# warm-up (heads 500 iterations; backbone at lr 0 for 500, then warming up over 1,000), masked
# attention annealed over the middle 4/6 of training.
max_iters = 19902
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999)),
    clip_grad=dict(max_norm=0.01, norm_type=2),
    # Total batch 16: with fewer GPUs raise this (e.g. 2 GPUs x batch 2 -> accumulative_counts=4).
    accumulative_counts=1,
    # Frozen parameters never enter the optimizer; the rest follow mmpretrain's layer decay.
    constructor='TrainableOnlyOptimWrapperConstructor',
    paramwise_cfg=dict(
        base_constructor='mmpretrain.LearningRateDecayOptimWrapperConstructor',
        layer_decay_rate=0.8))
param_scheduler = [
    dict(type='TwoStageWarmupPolyLR', warmup_iters=(500, 1000), power=0.9,
         begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=2000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000, max_keep_ckpts=3,
                    save_best='mIoU'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
# Windows derived from max_iters and the model's query blocks: for ViT-L (4 blocks) they are
# start [3317, 6634, 9951, 13268], end [6634, 9951, 13268, 16585], the reference's values.
custom_hooks = [
    dict(type='TrainableParamsHook'),
    dict(type='MaskAnnealingHook', auto_windows=True, power=0.9),
]
