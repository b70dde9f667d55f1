# EoMT-L on DINOv3 ViT-L/16, Cityscapes 1024, full fine-tuning. The reference publishes no
# Cityscapes DINOv3 checkpoint or config: this recipe is the DINOv2 one
# (eomt_dinov2-reg4-l_1xb16-20k_cityscapes-1024x1024.py, tue-mps/eomt
# configs/dinov2/cityscapes/semantic/eomt_large_1024.yaml), inherited unchanged: 19,902
# iterations at batch 16, AdamW 1e-4, layer-wise lr decay 0.8 (block i: 1e-4 * 0.8 ** (23 - i),
# the embeddings as block 0, final norm and heads 1e-4), poly 0.9 with the two-stage warm-up
# (500, 1000), annealing windows derived from the length. Only the backbone and its weights
# differ. Untested at full scale.
_base_ = ['./eomt_dinov2-reg4-l_1xb16-20k_cityscapes-1024x1024.py']
# Made by tools/convert_weights.py from Meta's dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth
# (README "Pretrained weights").
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
