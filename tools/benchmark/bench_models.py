"""EoMT-B models and inputs for the benchmark scripts in this folder.

The model is the one of ``configs/eomt_lora_b640.py`` (DINOv2-reg4 ViT-B/16, 19 classes,
100 queries, queries before the last 3 blocks) built with random weights: the pretrained
initialisation is dropped, since timings and memory do not depend on the weight values.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA_CONFIG_FILE = os.path.join(REPO, 'configs', 'eomt_lora_b640.py')

# Variant name -> how the model is built and what trains.
#   lora: None (no LoRA) or overrides of the config's lora_config (the default LoRA)
#   freeze_backbone: every backbone parameter frozen (norms included), no LoRA
#   checkpoint_blocks / checkpoint_decoder: EoMT's activation-checkpointing options
VARIANTS: Dict[str, dict] = {
    'full': dict(lora=None, freeze_backbone=False, checkpoint_blocks=0,
                 help='full fine-tuning, every parameter trains'),
    'lora': dict(lora={}, freeze_backbone=False, checkpoint_blocks=0,
                 help='default LoRA: rank 8, qkv/proj/fc1/fc2, base frozen, dropout 0.1'),
    'lora_p0': dict(lora=dict(lora_dropout=0.0), freeze_backbone=False, checkpoint_blocks=0,
                    help='default LoRA with dropout 0'),
    'lora_ckpt': dict(lora={}, freeze_backbone=False, checkpoint_blocks='frozen',
                      help="default LoRA + checkpoint_blocks='frozen' (the 9 blocks before the "
                      'queries)'),
    'lora_ckdec': dict(lora={}, freeze_backbone=False, checkpoint_blocks=0,
                       checkpoint_decoder=True,
                       help='default LoRA + checkpoint_decoder=True (upscaler and heads '
                       'recomputed)'),
    'lora_ckpt_ckdec': dict(lora={}, freeze_backbone=False, checkpoint_blocks='frozen',
                            checkpoint_decoder=True,
                            help="default LoRA + checkpoint_blocks='frozen' + checkpoint_decoder"),
    'lora_ckall': dict(lora={}, freeze_backbone=False, checkpoint_blocks=12,
                       checkpoint_decoder=True,
                       help='default LoRA + all 12 blocks and the decoder checkpointed'),
    'lora_task': dict(lora=dict(base_prefixes=['backbone', 'decoder']), freeze_backbone=False,
                      checkpoint_blocks=0,
                      help='default LoRA on an already trained EoMT (a task adapter): the decoder '
                      'is part of the frozen base too, only LoRA and norms train'),
    'heads': dict(lora=None, freeze_backbone=True, checkpoint_blocks=0,
                  help='heads only: backbone frozen, no LoRA'),
}


def eomt_b_config(size: int, lora: Optional[dict], checkpoint_blocks=0,
                  checkpoint_decoder: bool = False) -> dict:
    """Model config of ``configs/eomt_lora_b640.py`` at ``size`` px, without pretrained init.

    Args:
        size: Training crop side (multiple of 16); sets the backbone's pos-embed grid.
        lora: None = no LoRA; a dict = the config's ``lora_config`` (the default LoRA)
            updated with it.
        checkpoint_blocks: EoMT ``checkpoint_blocks``.
        checkpoint_decoder: EoMT ``checkpoint_decoder``.
    """
    from mmengine.config import Config
    if size % 16:
        raise ValueError(f'size must be a multiple of the patch size 16, got {size}')
    cfg = Config.fromfile(LORA_CONFIG_FILE).model.to_dict()
    cfg['backbone'].pop('init_cfg', None)
    cfg['backbone']['img_size'] = size
    cfg.pop('data_preprocessor', None)
    default_lora = cfg.pop('lora_config')
    if lora is not None:
        cfg['lora_config'] = {**copy.deepcopy(default_lora), **lora}
    cfg['test_cfg'] = dict(mode='whole')
    cfg['checkpoint_blocks'] = checkpoint_blocks
    cfg['checkpoint_decoder'] = checkpoint_decoder
    return cfg


def build_eomt_b(size: int, variant: str, backbone_arch: Optional[dict] = None) -> nn.Module:
    """EoMT-B for one of :data:`VARIANTS`, in training mode, trainability settled.

    Args:
        size: Crop side (multiple of 16).
        variant: A key of :data:`VARIANTS`.
        backbone_arch: Replaces the backbone's ``arch`` (tests build a narrow 12-block ViT
            with the same structure); None = ViT-B.
    """
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    import eomt_mm  # noqa: F401  registers the project's models
    from mmseg.registry import MODELS
    if variant not in VARIANTS:
        raise KeyError(f'unknown variant {variant!r}; choose from {sorted(VARIANTS)}')
    spec = VARIANTS[variant]
    cfg = eomt_b_config(size, spec['lora'], spec['checkpoint_blocks'],
                        spec.get('checkpoint_decoder', False))
    if backbone_arch is not None:
        cfg['backbone']['arch'] = backbone_arch
    model = MODELS.build(cfg)
    if spec['freeze_backbone']:
        model.backbone.requires_grad_(False)
    return model.train()


def random_batch(size: int, batch: int, num_classes: int = 19,
                 seed: int = 0) -> Tuple[torch.Tensor, List]:
    """Normalised-looking images and block-wise random labels (32 px cells)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, 3, size, size, generator=gen)
    cell = 32
    samples = []
    for _ in range(batch):
        grid = torch.randint(0, num_classes, (-(-size // cell), ) * 2, generator=gen)
        label = grid.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:size, :size]
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=label[None])
        sample.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                                 pad_shape=(size, size)))
        samples.append(sample)
    return imgs, samples
