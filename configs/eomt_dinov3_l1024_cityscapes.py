_base_ = ['./eomt/eomt_dinov3-l_1xb16-20k_cityscapes-1024x1024.py']
