"""DINOv2 backbone weights: Meta's hub layout and timm's layout -> :class:`DINOv2`.

Source layouts:

* ``meta-dinov2``: Meta's hub files (``dinov2_vitb14_reg4_pretrain.pth``): ``cls_token``,
  ``register_tokens``, ``mask_token``, CLS-inclusive ``pos_embed``, ``blocks.{i}.*`` (giant:
  ``mlp.w12`` / ``mlp.w3``), ``norm.*``.
* ``timm``: timm ``vit_*_reg4_dinov2`` state dicts: ``reg_token``, patch-only ``pos_embed``
  (``no_embed_class``: the CLS position is already folded into ``cls_token``).

The family's intermediate names are timm's (both readers return them; the EoMT readers in
:mod:`eomt_mm.converters.eomt` too). The target: backbone keys are
:class:`~eomt_mm.models.backbones.DINOv2`'s own ``state_dict`` keys prefixed ``backbone.``;
``pos_embed`` covers the patch grid only and the source's CLS position embedding (Meta layout)
is added into ``cls_token``, exactly like timm's ``no_embed_class`` models and the EoMT
reference (github.com/tue-mps/eomt). Register tokens get no position embedding. The converted
backbone is checked key-by-key and shape-by-shape against a ``DINOv2`` built on the ``meta``
device from the inferred architecture.
"""
from __future__ import annotations

import math
import re
from typing import List, Optional, Tuple, Union

import torch

from eomt_mm.models.backbones import DINOv2
from eomt_mm.utils.resample import resample_patch_kernel, resize_pos_embed_grid

from .common import (BackboneFamily, CheckpointConversionError, ConversionReport, StateDict,
                     check_fits_module)
from .vit import (backbone_rules, check_preset, count_blocks, rename_backbone,
                  swiglu_feedforward_channels)

__all__ = ['read_meta_dinov2', 'read_timm', 'infer_backbone_arch', 'inspect_dinov2',
           'convert_dinov2', 'DINOV2_FAMILY']

# timm's token names -> DINOv2's (the blocks: eomt_mm.converters.vit).
_TOKEN_RULES: List[Tuple[str, str]] = [
    (r'cls_token', 'cls_token'),
    (r'reg_token', 'register_tokens'),
    (r'pos_embed', 'pos_embed'),
]


# ----------------------------------------------------------------- source -> timm-like names
def read_meta_dinov2(sd: StateDict,
                     report: ConversionReport) -> Tuple[StateDict, Optional[StateDict]]:
    """Meta's hub layout -> (timm-named backbone weights, no decoder).

    Args:
        sd: The source state dict.
        report: Records the skipped ``mask_token`` and the CLS position folding.

    Returns:
        ``(backbone weights, None)``.
    """
    sd = dict(sd)
    if 'cls_token' not in sd or 'pos_embed' not in sd:
        raise CheckpointConversionError('not a Meta DINOv2 checkpoint: needs cls_token and '
                                        f'pos_embed, found keys {sorted(sd)[:8]}...')
    if 'mask_token' in sd:
        sd.pop('mask_token')
        report.skipped.append(('mask_token', 'DINOv2 pre-training only (iBOT masking)'))
    pos = sd.pop('pos_embed')
    side = math.isqrt(pos.shape[1] - 1)
    if pos.ndim != 3 or side * side != pos.shape[1] - 1:
        raise CheckpointConversionError(
            f'Meta pos_embed must be [1, 1 + h*w, C] with a square grid (CLS position first), '
            f'got {tuple(pos.shape)}')
    # Fold the CLS position into the token (timm no_embed_class / EoMT convention).
    out = {'cls_token': sd.pop('cls_token') + pos[:, :1], 'pos_embed': pos[:, 1:]}
    report.notes.append('added the CLS position embedding (pos_embed[:, 0]) into cls_token; '
                        'pos_embed now covers patches only')
    if 'register_tokens' in sd:
        out['reg_token'] = sd.pop('register_tokens')
    for key, value in sd.items():
        key = re.sub(r'^(blocks\.\d+\.mlp)\.w12\.', r'\1.fc1.', key)
        key = re.sub(r'^(blocks\.\d+\.mlp)\.w3\.', r'\1.fc2.', key)
        out[key] = value
    return out, None


def read_timm(sd: StateDict, report: ConversionReport) -> Tuple[StateDict, Optional[StateDict]]:
    """timm's layout (already the family's intermediate names) -> (backbone, no decoder).

    Args:
        sd: The source state dict.
        report: Unused (nothing is renamed here).

    Returns:
        ``(backbone weights, None)``.
    """
    if 'cls_token' not in sd or 'pos_embed' not in sd:
        raise CheckpointConversionError('not a timm ViT checkpoint: needs cls_token and pos_embed, '
                                        f'found keys {sorted(sd)[:8]}...')
    return dict(sd), None


# --------------------------------------------------------------------- timm-like -> ours
def infer_backbone_arch(timm_sd: StateDict) -> dict:
    """Infer the DINOv2 architecture (everything but the head count) from timm-named weights.

    Args:
        timm_sd: Backbone weights with timm names.

    Returns:
        ``embed_dims``, ``num_layers``, ``feedforward_channels``, ``ffn_type``,
        ``patch_size``, ``num_register_tokens``, ``in_channels``.
    """
    try:
        embed_dims = timm_sd['cls_token'].shape[-1]
        fc1 = timm_sd['blocks.0.mlp.fc1.weight']
        fc2 = timm_sd['blocks.0.mlp.fc2.weight']
        kernel = timm_sd['patch_embed.proj.weight']
    except KeyError as exc:
        raise CheckpointConversionError(f'DINOv2 backbone weights incomplete: {exc} missing'
                                        ) from exc
    num_layers = count_blocks(timm_sd, 'DINOv2')
    if fc1.shape[0] == 2 * fc2.shape[1]:
        ffc, ffn_type = swiglu_feedforward_channels(fc2.shape[1]), 'swiglu_fused'
    elif fc1.shape[0] == fc2.shape[1]:
        ffc, ffn_type = fc1.shape[0], 'origin'
    else:
        raise CheckpointConversionError(f'cannot tell the FFN type from fc1 {tuple(fc1.shape)} and '
                                        f'fc2 {tuple(fc2.shape)}')
    if kernel.shape[-1] != kernel.shape[-2]:
        raise CheckpointConversionError(f'non-square patch kernel {tuple(kernel.shape)}')
    num_reg = timm_sd['reg_token'].shape[1] if 'reg_token' in timm_sd else 0
    return dict(embed_dims=int(embed_dims), num_layers=num_layers,
                feedforward_channels=int(ffc), ffn_type=ffn_type,
                patch_size=int(kernel.shape[-1]), num_register_tokens=int(num_reg),
                in_channels=int(kernel.shape[1]))


def _check_against_model(ours: StateDict, arch: dict, num_heads: int,
                         grid: Tuple[int, int]) -> None:
    """Build DINOv2 on the meta device and require identical keys and shapes."""
    with torch.device('meta'):
        model = DINOv2(
            arch=dict(embed_dims=arch['embed_dims'], num_layers=arch['num_layers'],
                      num_heads=num_heads, feedforward_channels=arch['feedforward_channels'],
                      ffn_type=arch['ffn_type']),
            img_size=(grid[0] * arch['patch_size'], grid[1] * arch['patch_size']),
            patch_size=arch['patch_size'], in_channels=arch['in_channels'],
            num_register_tokens=arch['num_register_tokens'])
    check_fits_module(ours, model, 'converted backbone does not fit DINOv2', limit=20)


def inspect_dinov2(timm_sd: StateDict, report: ConversionReport,
                   arch: Optional[str] = None) -> dict:
    """Drop an empty register-token tensor, infer the architecture, check the named preset.

    Args:
        timm_sd: timm-named backbone weights (modified in place: an empty ``reg_token`` is
            removed).
        report: Records the removal.
        arch: DINOv2 preset name (``'s'``, ``'b'``, ``'l'``, ``'g'``...) the weights must be;
            None checks nothing.

    Returns:
        :func:`infer_backbone_arch`'s dict plus ``num_heads`` (the preset's, None without
        ``arch``) and ``arch``.
    """
    reg = timm_sd.get('reg_token')
    if reg is not None and reg.shape[1] == 0:  # HF EoMT keeps a [1, 0, C] tensor for "none"
        del timm_sd['reg_token']
        report.skipped.append(('reg_token', 'empty (no register tokens)'))
    info = infer_backbone_arch(timm_sd)
    info['num_heads'] = None
    if arch:
        info['num_heads'] = check_preset(info, arch, DINOv2.arch_zoo, 'DINOv2', dict(
            embed_dims=None, num_layers=None, feedforward_channels=None,
            ffn_type='origin'))['num_heads']
    info['arch'] = arch
    return info


def convert_dinov2(timm_sd: StateDict, info: dict, report: ConversionReport,
                   patch_size: int,
                   img_size: Optional[Union[int, Tuple[int, int]]] = None
                   ) -> Tuple[StateDict, dict]:
    """Resample, resize and rename timm-named weights into ``backbone.``-prefixed DINOv2 keys.

    Args:
        timm_sd: timm-named backbone weights (their tensors may be replaced in place).
        info: :func:`inspect_dinov2`'s result for these weights.
        report: Records the mapping and every resampling.
        patch_size: Target patch size; a different one than the source's resamples the patch
            kernel (FlexiViT pseudo-inverse, bicubic, antialias).
        img_size: Resize the position embedding to the grid ``img_size // patch_size``
            (bicubic, anti-aliased like timm). None keeps the source grid.

    Returns:
        ``(state_dict, backbone meta)``.
    """
    src_patch = info['patch_size']
    if patch_size != src_patch:
        timm_sd['patch_embed.proj.weight'] = resample_patch_kernel(
            timm_sd['patch_embed.proj.weight'], (patch_size, patch_size))
        report.notes.append(f'resampled the patch kernel {src_patch}x{src_patch} -> '
                            f'{patch_size}x{patch_size} (FlexiViT pseudo-inverse, bicubic, '
                            'antialias)')

    pos = timm_sd['pos_embed']
    side = math.isqrt(pos.shape[1])
    if pos.ndim != 3 or side * side != pos.shape[1]:
        raise CheckpointConversionError(f'pos_embed must be a square patch-only grid [1, h*w, C], '
                                        f'got {tuple(pos.shape)} (a CLS-inclusive table means the '
                                        "source is in Meta's layout: use --format meta-dinov2)")
    grid = (side, side)
    if img_size is not None:
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if any(s % patch_size for s in img_hw):
            raise CheckpointConversionError(f'img_size {img_hw} is not a multiple of the patch '
                                            f'size {patch_size}')
        new_grid = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        if new_grid != grid:
            timm_sd['pos_embed'] = resize_pos_embed_grid(pos, grid, new_grid)
            report.notes.append(f'resized pos_embed {grid[0]}x{grid[1]} -> '
                                f'{new_grid[0]}x{new_grid[1]} (bicubic, antialias)')
            grid = new_grid

    rules = backbone_rules(_TOKEN_RULES, 'fc1', 'fc2', info['ffn_type'])
    ours = rename_backbone(timm_sd, rules, report, 'DINOv2')
    _check_against_model(ours, dict(info, patch_size=patch_size), info['num_heads'] or 1, grid)
    meta = dict(arch=info['arch'], num_heads=info['num_heads'],
                embed_dims=info['embed_dims'], num_layers=info['num_layers'],
                feedforward_channels=info['feedforward_channels'],
                ffn_type=info['ffn_type'], patch_size=patch_size,
                source_patch_size=src_patch,
                num_register_tokens=info['num_register_tokens'],
                pos_embed_grid=list(grid),
                img_size=[grid[0] * patch_size, grid[1] * patch_size])
    return {'backbone.' + k: v for k, v in ours.items()}, meta


#: The DINOv2 family, used by every format in :data:`eomt_mm.converters.formats.FORMATS` so far.
DINOV2_FAMILY = BackboneFamily(name='DINOv2', inspect=inspect_dinov2, convert=convert_dinov2)
