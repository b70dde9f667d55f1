# Short name of the RbA outlier-exposure fine-tune (RbA's released settings: 2,000 iterations,
# COCO outliers pasted with p = 0.1, AMP): see the model-zoo config for the recipe, its options,
# the start checkpoint (`load_from`) and the data layout.
_base_ = ['./eomt/eomt-lora-r8-rba_dinov2-reg4-b_1xb16-2k_cityscapes-640x640-coco-outliers.py']
