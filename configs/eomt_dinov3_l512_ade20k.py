_base_ = ['./eomt/eomt_dinov3-l_1xb16-20k_ade20k-512x512.py']
