_base_ = ['./eomt/eomt_dinov2-reg4-l_1xb16-20k_cityscapes-1024x1024.py']
