# EoMT on DINOv2-reg4 ViT-g/16 (1.1B parameters), Cityscapes 1024, trained with FSDP through
# mmengine's FlexibleRunner: parameters, gradients and optimizer state are sharded over the GPUs,
# for backbones whose full fine-tuning does not fit one GPU. 8 GPUs x batch 2 = the reference's 16.
#
#   GPUS=8 bash tools/dist_train.sh configs/eomt_g1024_cityscapes_fsdp.py
#
# Not run by this project yet (no multi-GPU machine); the CPU test suite only builds it.
_base_ = ['./eomt_dinov2-reg4-l_1xb16-20k_cityscapes-1024x1024.py']
pretrained = 'checkpoints/dinov2_vitg14_reg4_p16.pth'
model = dict(
    backbone=dict(
        arch='g',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decoder=dict(num_blocks=5))
train_dataloader = dict(batch_size=2)
runner_type = 'FlexibleRunner'
strategy = dict(
    type='FSDPStrategy',
    # Full (unsharded) state dicts: checkpoints stay loadable with weights-only loading and by
    # a single-GPU test run.
    state_dict_cfg='full',
    model_wrapper=dict(
        auto_wrap_policy=dict(
            type='torch.distributed.fsdp.wrap.size_based_auto_wrap_policy',
            min_num_params=int(1e7))))
