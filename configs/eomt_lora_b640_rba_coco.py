# Short name of the RbA outlier-exposure fine-tune (LoRA + mask MLP, COCO outliers): see the
# model-zoo config for the recipe, the start checkpoint (`load_from`) and the data layout.
_base_ = ['./eomt/eomt-lora-r8-rba_dinov2-reg4-b_1xb16-30k_cityscapes-640x640-coco-outliers.py']
