# Outlier exposure (RbA, "RbA: Segmenting Unknown Regions Rejected by All", ICCV 2023;
# NazirNayal8/RbA): fine-tuning of a Cityscapes-trained EoMT ViT-B/16 (LoRA r=8 model) at
# 640 with COCO objects pasted into the training frames and the RbA outlier loss.
#
# Defaults = RbA's released outlier-exposure settings (NazirNayal8/RbA,
# ckpts/swin_b_1dl_rba_ood_coco/config.yaml):
#
# | what        | this config (default)                     | RbA's release        | option |
# |-------------|-------------------------------------------|----------------------|--------|
# | outlier loss| 0.5 (mean_ID relu(s)^2 + mean_OOD relu(5-s)^2), s = -sum_k tanh(S_k), S from softmax probs | same | - |
# | outliers    | COCO train2017 objects, p = 0.1 per sample| p = 0.1              | A      |
# | schedule    | 2,000 iterations, batch 16, AdamW 1e-4, poly 0.9, no warm-up | same | B |
# | precision   | AMP (fp16, dynamic loss scale); fp32 on a CPU-only machine | AMP   | -      |
# | clipping    | gradient norm 0.01 over all trained params| 0.01 (full model)    | -      |
# | trainable   | mask MLP (decoder.mask_head) only; LoRA adapters kept, frozen | mask MLP only | C |
# | evaluation  | sliding 640 windows, mIoU; anomaly scores msp, maxlogit, rba | - | -   |
#
# Options (documented choices other than RbA's):
# A. prob=0.5 in PasteOutliers below: paste into every other sample (RbA's paper text,
#    Mask2Anomaly uses 0.2).
# B. a longer schedule, e.g. 30k iterations with a 500-iteration linear warm-up: set
#    max_iters = 30000 and param_scheduler = [dict(type='LinearLR', start_factor=1e-3, begin=0,
#    end=500, by_epoch=False), dict(type='PolyLR', power=0.9, eta_min=0.0, begin=500,
#    end=max_iters, by_epoch=False)] (the 30k recipe this model-zoo entry had before).
# C. trainable set. RbA trains only the mask MLP (FREEZE_TRANSFORMER_DECODER_EXCEPT_MLP): the
#    start model's LoRA adapters are loaded but stay frozen (lora_config.train_adapters=False).
#    Set train_adapters=True to train the adapters with the mask MLP (the choice this
#    model-zoo entry had before, and the documented option for longer schedules (B)).
#
# Start checkpoint: any EoMT ViT-B/16 Cityscapes checkpoint of this code base, e.g. the output of
# configs/eomt_lora_b640.py (its LoRA adapters are loaded) or of configs/eomt_full_b640.py (no
# adapter keys: the adapters start at zero, i.e. at that model). Put it at `load_from` or pass
# `--cfg-options load_from=PATH` to tools/train.py. Its weights are loaded after initialisation,
# so no DINOv2 file is needed.
#
# Outliers: data/coco/train2017/*.jpg + data/coco/annotations/instances_train2017.json.
# PasteOutliers drops every COCO image containing a class that overlaps Cityscapes (person,
# bicycle, car, motorcycle, bus, truck, traffic light, stop sign) and pastes the union of the
# remaining instance masks of one image, labelled 254; the model ignores 254 in the 19-class
# set loss and uses it as the outlier target of the RbA loss.
_base_ = ['./eomt-lora-r8_dinov2-reg4-b_1xb16-20k_cityscapes-640x640.py']

load_from = 'checkpoints/eomt_dinov2-reg4-b_cityscapes-640x640.pth'
coco_root = 'data/coco/'
outlier_label = 254
crop_size = (640, 640)

model = dict(
    # The anomaly-enabled EoMT (anomaly scores in predictions, outlier loss in training).
    type='AnomalyEoMT',
    # The start checkpoint replaces every weight: no DINOv2 initialisation.
    backbone=dict(init_cfg=None),
    # The start model is fully trained: its masked attention is already annealed away.
    decoder=dict(masked_attn_enabled=False),
    outlier_label=outlier_label,
    # RbA: 0.5 * mean_ID relu(s)^2 + 0.5 * mean_OOD relu(5 - s)^2 on s = -sum_k tanh(S_k).
    outlier_loss=dict(type='RbALoss', inlier_margin=0.0, outlier_margin=5.0,
                      score_source='probs', loss_weight=1.0, loss_name='loss_rba'),
    test_cfg=dict(mode='slide', crop_size=crop_size[0],
                  anomaly_scores=['msp', 'maxlogit', 'rba']),
    # The decoder joins the base so that it is frozen (heads, queries and upscaler stay as
    # trained) except the mask MLP; norms are frozen as well (see option C above).
    lora_config=dict(
        base_prefixes=['backbone', 'decoder'],
        trainable_modules=['decoder.mask_head'],
        trainable_norms=False,
        train_adapters=False))

train_pipeline = [
    dict(type='LoadImageFromFileChecked'),
    dict(type='LoadAnnotationsChecked', num_classes=19),
    # Before any geometric transform, so the object is scaled, cropped and flipped with the
    # frame (scale_range is relative to the frame's short side at full resolution).
    dict(type='PasteOutliers',
         ann_file=coco_root + 'annotations/instances_train2017.json',
         img_dir=coco_root + 'train2017',
         prob=0.1,  # RbA's release; option A: 0.5
         scale_range=(0.05, 0.3),
         paste_label=outlier_label),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=16, dataset=dict(pipeline=train_pipeline))

# RbA's release: 2,000 iterations at lr 1e-4, poly 0.9, no warm-up, AMP, clipping at norm 0.01.
# One learning rate for all trained parameters (no layer decay: the trained set is small).
# AmpOptimWrapper needs a GPU: tools/train.py falls back to OptimWrapper (fp32) with a warning
# on a CPU-only machine (eomt_mm.engine.amp.fall_back_to_fp32_on_cpu).
max_iters = 2000
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    dtype='float16',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999)),
    clip_grad=dict(max_norm=0.01, norm_type=2),
    accumulative_counts=1,
    constructor='TrainableOnlyOptimWrapperConstructor')
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
# No mask annealing: masked attention is off (see the decoder above).
custom_hooks = [dict(type='TrainableParamsHook')]
