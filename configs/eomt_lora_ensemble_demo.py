_base_ = ['./eomt/eomt-lora-r8-ensemble4_dinov2-tiny-p8_1xb4-600_demo-roads-128x128.py']
# Four LoRA members of the built-in demo model trained jointly on one shared frozen prefix
# (README "Adapter ensembles"). Render the data first: `python tools/make_demo_data.py`.
