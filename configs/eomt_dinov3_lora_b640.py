_base_ = ['./eomt/eomt-lora-r8_dinov3-b_1xb16-20k_cityscapes-640x640.py']
