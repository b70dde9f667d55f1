# The LoRA fine-tuning experiment on DINOv3: everything as in
# eomt-lora-r8_dinov2-reg4-b_1xb16-20k_cityscapes-640x640.py (Cityscapes 640 crops, 19,902
# iterations at batch 16, AdamW 1e-4, layer decay 0.8, poly 0.9 with the two-stage warm-up;
# LoRA r=8, alpha=16, dropout 0.1 on qkv / proj / fc1 / fc2, the pretrained backbone frozen
# except its norms; queries, heads and upscaler train), inherited from it, on a DINOv3 ViT-B/16
# instead of DINOv2-reg4. The default LoRA targets have the same names on DINOv3 (fused
# attn.qkv with its key bias held at zero, attn.proj, ffn.layers.0.0, ffn.layers.1).
_base_ = ['./eomt-lora-r8_dinov2-reg4-b_1xb16-20k_cityscapes-640x640.py']
# Made by tools/convert_weights.py from Meta's dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth
# (README "Pretrained weights").
pretrained = 'checkpoints/dinov3_vitb16_lvd1689m.pth'
model = dict(
    # The DINOv3 defaults: 4 registers, RoPE base 100, training-time RoPE rescale 2.0 as in
    # ../_base_/models/eomt_dinov3-b.py (that file explains why).
    backbone=dict(
        _delete_=True,
        type='DINOv3',
        arch='b',
        img_size=_base_.crop_size[0],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')))
