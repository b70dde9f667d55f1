# The built-in demo (README): a tiny EoMT with LoRA on the synthetic road scenes that
# `tools/make_demo_data.py` renders into data/demo. CPU-sized; no download, no pretrained weights.
#
# | what        | value                                                                       |
# |-------------|-----------------------------------------------------------------------------|
# | model       | EoMT on a 6-block, 96-wide DINOv2-style ViT (patch 8, 4 registers),         |
# |             | 16 queries in the last 2 blocks                                             |
# | data        | data/demo: 48 train / 12 val 128x256 frames, 19 Cityscapes classes          |
# | schedule    | 600 iterations, batch 4, AdamW 1e-3, poly with the two-stage warm-up        |
# | adapters    | LoRA r=8, alpha=16, dropout 0.1 on qkv / proj / fc1 / fc2, base frozen      |
# | evaluation  | whole 128x256 frames, mIoU; anomaly scores on the held-out anomaly split    |
#
# With no pretrained backbone to adapt, the frozen base here is the random initialisation: the
# demo shows the mechanics (injection, freezing, parameter summary, training, evaluation,
# anomaly scoring), not what LoRA does for a DINOv2 backbone.
_base_ = [
    '../_base_/models/eomt_dinov2-b.py',
    '../_base_/datasets/demo_roads.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/eomt_cityscapes_20k.py',
]
crop_size = (128, 128)
max_iters = 600
model = dict(
    # The anomaly-enabled EoMT: same weights, plus anomaly score maps in its predictions.
    type='AnomalyEoMT',
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch=dict(
            _delete_=True, embed_dims=96, num_layers=6, num_heads=3, feedforward_channels=384),
        patch_size=8,
        img_size=crop_size[0]),
    decoder=dict(num_queries=16, num_blocks=2, num_points=1024),
    # Whole 128x256 frames (sides are multiples of the patch size).
    test_cfg=dict(_delete_=True, mode='whole', anomaly_scores=['msp', 'maxlogit', 'rba']),
    lora_config=dict(
        enabled=True,
        rank=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=['qkv', 'proj', 'fc1', 'fc2'],
        freeze_base_model=True))
optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='TwoStageWarmupPolyLR', warmup_iters=(50, 100), power=0.9,
         begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=200, max_keep_ckpts=2, save_best=None))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
