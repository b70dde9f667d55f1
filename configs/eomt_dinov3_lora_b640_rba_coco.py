# Short name of the RbA outlier-exposure fine-tune on DINOv3-B: see the model-zoo config.
_base_ = ['./eomt/eomt-lora-r8-rba_dinov3-b_1xb16-2k_cityscapes-640x640-coco-outliers.py']
