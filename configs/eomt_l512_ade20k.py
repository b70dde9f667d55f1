_base_ = ['./eomt/eomt_dinov2-reg4-l_1xb16-40k_ade20k-512x512.py']
