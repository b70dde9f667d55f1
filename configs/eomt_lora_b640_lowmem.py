# The LoRA fine-tuning experiment (eomt_lora_b640.py) with activation checkpointing: same gradients,
# lower peak training memory, more compute per step (README, "Performance").
#
# | what          | value                                                              |
# |---------------|--------------------------------------------------------------------|
# | base          | eomt_lora_b640.py (EoMT-B 640, LoRA r=8 on qkv/proj/fc1/fc2, 0.1)  |
# | blocks        | the 9 blocks before the queries recompute in backward              |
# | decoder       | upscaler and heads recompute in backward (4 predictions per step)  |
_base_ = ['./eomt_lora_b640.py']
model = dict(checkpoint_blocks='frozen', checkpoint_decoder=True)
