_base_ = ['./eomt/eomt_dinov2-reg4-g_8xb2-20k_cityscapes-1024x1024-fsdp.py']
