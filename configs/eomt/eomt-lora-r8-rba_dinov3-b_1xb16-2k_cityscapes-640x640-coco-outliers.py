# Outlier exposure (RbA) on DINOv3: the RbA fine-tuning of
# eomt-lora-r8-rba_dinov2-reg4-b_1xb16-2k_cityscapes-640x640-coco-outliers.py, inherited
# unchanged (data with pasted COCO outliers, losses, schedule, what trains, evaluation), for a
# Cityscapes-trained EoMT on DINOv3 ViT-B/16 instead of DINOv2-reg4.
#
# Start checkpoint (`load_from`): an EoMT DINOv3-B/16 Cityscapes checkpoint of this code base,
# e.g. the output of eomt-lora-r8_dinov3-b_1xb16-20k_cityscapes-640x640.py. Its weights replace
# every initial one, so no DINOv3 file is needed.
_base_ = ['./eomt-lora-r8-rba_dinov2-reg4-b_1xb16-2k_cityscapes-640x640-coco-outliers.py']
load_from = 'checkpoints/eomt_dinov3-b_cityscapes-640x640.pth'
model = dict(
    # The DINOv3 defaults (../_base_/models/eomt_dinov3-b.py); no initialisation file.
    backbone=dict(_delete_=True, type='DINOv3', arch='b', img_size=640, init_cfg=None))
