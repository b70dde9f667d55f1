# Runtime shared by every eomt_mm config: registries, environment, logging, visualisation.
default_scope = 'mmseg'
# 'eomt_mm' registers the components; importing 'eomt_mm.engine.safe_checkpoint_install'
# installs weights-only checkpoint loading and atomic checkpoint writes into mmengine (what it
# changes: eomt_mm/engine/safe_checkpoint.py), also under mmseg's own tools/train.py.
custom_imports = dict(
    imports=['eomt_mm', 'eomt_mm.engine.safe_checkpoint_install'], allow_failed_imports=False)

env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # tools/train.py switches to gloo when no GPU is present.
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
tta_model = dict(type='SegTTAModel')
