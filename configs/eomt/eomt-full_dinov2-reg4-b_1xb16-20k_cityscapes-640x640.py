# Full fine-tuning baseline for the LoRA fine-tuning experiment: same model, data and schedule as
# eomt-lora-r8_dinov2-reg4-b_1xb16-20k_cityscapes-640x640.py, every parameter trained.
_base_ = ['./eomt-lora-r8_dinov2-reg4-b_1xb16-20k_cityscapes-640x640.py']
model = dict(lora_config=None)
