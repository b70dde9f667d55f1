# Reference recipe: EoMT-L on DINOv3 ViT-L/16, ADE20K semantic 512, full fine-tuning
# (tue-mps/eomt configs/dinov3/ade20k/semantic/eomt_large_512.yaml; its model zoo,
# model_zoo/dinov3.md: 59.5 mIoU). Data, crops, heads and evaluation are the DINOv2 ADE20K
# recipe's (eomt_dinov2-reg4-l_1xb16-40k_ade20k-512x512.py), inherited; the backbone, its weights
# and the schedule below differ.
_base_ = ['./eomt_dinov2-reg4-l_1xb16-40k_ade20k-512x512.py']
# Made by tools/convert_weights.py from Meta's dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth
# (README "Pretrained weights"); the reference starts from the same LVD-1689M ViT-L.
pretrained = 'checkpoints/dinov3_vitl16_lvd1689m.pth'
model = dict(
    # The backbone of ../_base_/models/eomt_dinov3-l.py (that file's base explains the RoPE
    # rescale), restated because a config has one parent and this one's is the DINOv2 recipe;
    # `_delete_` drops DINOv2's patch_size (DINOv3 is patch 16 natively).
    backbone=dict(
        _delete_=True,
        type='DINOv3',
        arch='l',
        img_size=_base_.crop_size[0],
        num_register_tokens=4,
        drop_path_rate=0.0,
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=2.0,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')))

# The schedule: 16 epochs at a total batch of 16, about 1,262 iterations per epoch as in
# ../_base_/schedules/eomt_ade20k_40k.py (31 epochs = 39,120), so 20,192 iterations. AdamW with
# weight decay 0.05 and gradient clipping at norm 0.01 as before; lr 2e-4, llrd 1.0, lr_mult 0.1,
# warm-up (2000, 3000), explicit mask-annealing windows, validation and checkpoints every 2,000.
#
# Effective learning rates. The reference's LightningModule.configure_optimizers gives block i
# lr * llrd ** (L - 1 - i) and the embeddings block 0's, the final norm and the last L2 blocks
# lr, everything outside the backbone lr. Its lr_mult branch,
# `elif (is_block or block_i == 0) and self.lr_mult != 1.0`, repeats the condition of the `if`
# above it and never runs, so lr_mult=0.1 changes nothing; with llrd=1.0 every factor is 1. So
# EVERY parameter, backbone and head alike, has the base lr 2e-4: here layer_decay_rate=1.0
# (mmpretrain's layer-decay constructor stays only to name the groups for the scheduler).
# Schedule (TwoStageWarmupPolyLR = the reference's TwoStageWarmupPolySchedule), at iteration t
# of T = 20,192:
#   queries, heads, upscaler: 2e-4 * t / 2000 for t < 2000, then
#                             2e-4 * (1 - (t - 2000) / (T - 2000)) ** 0.9;
#   backbone:                 0 for t < 2000, 2e-4 * (t - 2000) / 3000 for t < 5000, then
#                             2e-4 * (1 - (t - 5000) / (T - 5000)) ** 0.9.
max_iters = 20192
optim_wrapper = dict(
    optimizer=dict(lr=2e-4),
    paramwise_cfg=dict(layer_decay_rate=1.0))
param_scheduler = [
    dict(type='TwoStageWarmupPolyLR', warmup_iters=(2000, 3000), power=0.9,
         begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=2000)
default_hooks = dict(checkpoint=dict(interval=2000))
# The reference's windows, per query block (earliest first): the first block's mask is
# annealed over the first 3,000 iterations, the other three one after another over 3,260 each;
# from 16,300 on no block is masked. They are the yaml's numbers, not derived from max_iters.
custom_hooks = [
    dict(type='TrainableParamsHook'),
    dict(type='MaskAnnealingHook', start_iters=[0, 6520, 9780, 13040],
         end_iters=[3000, 9780, 13040, 16300], power=0.9),
]
