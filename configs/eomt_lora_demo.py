_base_ = ['./eomt/eomt-lora-r8_dinov2-tiny-p8_1xb4-600_demo-roads-128x128.py']
