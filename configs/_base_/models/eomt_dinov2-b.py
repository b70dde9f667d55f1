# EoMT ("Your ViT is Secretly an Image Segmentation Model", CVPR 2025; tue-mps/eomt) on a
# DINOv2-with-registers ViT-B/16: 12 blocks, queries enter before the last 3.
# Pretrained weights: `python tools/convert_weights.py dinov2_vitb14_reg4_pretrain.pth
#   checkpoints/dinov2_vitb14_reg4_to_p16.pth --format meta-dinov2 --patch-size 16`
# (the 14x14 patch kernel is resampled to 16x16 once, as in the reference).
data_preprocessor = dict(
    type='SegDataPreProcessor',
    # ImageNet statistics on 0-255 RGB: the only place images are normalised.
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EoMT',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='DINOv2',
        arch='b',
        patch_size=16,
        num_register_tokens=4,
        img_size=640,
        drop_path_rate=0.0),
    decoder=dict(
        type='EoMTDecoder',
        num_classes=19,
        num_queries=100,
        num_blocks=3,
        # Mask2Former set loss, reference weights and point counts.
        num_points=12544,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1),
    # Sliding windows of the crop size, short side resized to it (reference placement); the
    # experiment config sets crop_size and data_preprocessor.size to its dataset's crop.
    test_cfg=dict(mode='slide', crop_size=640),
    # Activation checkpointing while training (memory for compute, same gradients):
    # checkpoint_blocks = n leading blocks or 'frozen' (all before the queries),
    # checkpoint_decoder = recompute the upscaler and heads of every prediction.
    checkpoint_blocks=0,
    checkpoint_decoder=False)
