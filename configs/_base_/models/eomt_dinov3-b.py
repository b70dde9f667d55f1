# EoMT on a DINOv3 ViT-B/16 (Simeoni et al., 2025, github.com/facebookresearch/dinov3): 12 blocks,
# queries enter before the last 3, with the same EoMT decoder, set loss and ImageNet
# normalisation as eomt_dinov2-b.py (the reference's DINOv3 EoMT-B, tue-mps/eomt
# configs/dinov3/coco/panoptic/eomt_base_640_2x.yaml, keeps them too).
# Pretrained weights (README "Pretrained weights"), converted once:
#   python tools/convert_weights.py dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth \
#       checkpoints/dinov3_vitb16_lvd1689m.pth --format meta-dinov3 --arch b
# Patch 16 natively and RoPE instead of a position table: nothing is resampled, and any input
# whose sides are multiples of 16 works. The SAT-493M (satellite) weights expect other statistics:
# with them set data_preprocessor mean=[109.65, 104.805, 75.48], std=[54.315, 39.78, 36.465]
# (Meta's README: mean (0.430, 0.411, 0.296), std (0.213, 0.156, 0.143), here x 255).
_base_ = ['./eomt_dinov2-b.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='DINOv3',
        arch='b',
        num_register_tokens=4,
        drop_path_rate=0.0,
        # RoPE coordinate augmentation while training only: one log-uniform rescale in [1/2, 2],
        # no shift, no jitter. That is what the reference's fine-tuning gets: it trains
        # transformers' DINOv3ViTModel, whose facebook/dinov3-* configs set
        # pos_embed_rescale=2.0 (shift and jitter None) and apply them in training mode.
        # Inference never augments.
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=2.0))
