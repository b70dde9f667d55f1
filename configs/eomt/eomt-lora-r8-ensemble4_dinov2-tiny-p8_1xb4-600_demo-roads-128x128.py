_base_ = ['./eomt-lora-r8_dinov2-tiny-p8_1xb4-600_demo-roads-128x128.py']
# Four LoRA members trained jointly on one frozen base (the built-in demo's model and data):
# the 4 blocks before the queries run once per batch, the 2 query blocks, the final norm and the
# heads run for the 4 members batched (AdapterEnsembleEoMT, eomt_mm/anomaly/ensemble).
#
# | what       | value                                                                          |
# |------------|--------------------------------------------------------------------------------|
# | members    | 4, seeds 0-3: own LoRA A initialisation, LoRA dropout and point sampling      |
# | adapters   | LoRA r=8 on the 2 query blocks only; their norms, the final norm and the heads |
# |            | train per member; nothing below the queries trains (the shared prefix)         |
# | loss       | sum of the members' set losses; gradients clipped per member (max norm 1)      |
# | outputs    | mean of the members' class scores; msp / maxlogit / rba of that mean,          |
# |            | mutual information and RbA variance between the members                        |
# | saved      | each member as an adapter folder in {work_dir}/members/member_{k}              |
model = dict(
    type='AdapterEnsembleEoMT',
    member_seeds=[0, 1, 2, 3],
    member_clip_grad=dict(max_norm=1.0),
    test_cfg=dict(anomaly_scores=['msp', 'maxlogit', 'rba', 'mutual_info', 'rba_variance']),
    lora_config=dict(
        layers={'last': 2},
        trainable_norms=False,
        trainable_modules=[r'backbone\.layers\.[45]\.ln[12]', 'backbone.ln1']))
# Clipping all members together would couple them; member_clip_grad clips each by its own norm.
optim_wrapper = dict(clip_grad=None)
custom_hooks = [
    dict(type='TrainableParamsHook'),
    dict(type='MaskAnnealingHook', auto_windows=True, power=0.9),
    dict(type='SaveMemberAdaptersHook'),
]
