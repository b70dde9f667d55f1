"""DINOv3 backbone weights: Meta's hub layout and transformers' layout -> :class:`DINOv3`.

Source layouts:

* ``meta-dinov3``: Meta's hub files (github.com/facebookresearch/dinov3,
  ``dinov3/models/vision_transformer.py``; e.g. ``dinov3_vitl16_pretrain_lvd1689m-*.pth``,
  ``dinov3_vith16plus_pretrain_lvd1689m-*.pth``, ``dinov3_vitl16_pretrain_sat493m-*.pth``):
  ``cls_token``, ``storage_tokens``, ``mask_token``, ``patch_embed.proj``, ``rope_embed.periods``,
  ``blocks.{i}.norm1 / attn.qkv (+ bias_mask) / attn.proj / ls1.gamma / norm2 / mlp.fc1|fc2``
  (SwiGLU: ``mlp.w1|w2|w3``) ``/ ls2.gamma``, ``norm``; the SAT-493M ViT-L adds
  ``local_cls_norm`` (used in pre-training only).
* ``hf-dinov3``: transformers ``DINOv3ViTModel`` (``model.safetensors`` of
  ``facebook/dinov3-vit*16-pretrain-*``): ``embeddings.{cls_token, mask_token, register_tokens,
  patch_embeddings}``, ``layer.{i}`` (``model.layer.{i}`` when saved by transformers 5),
  ``attention.{q,k,v,o}_proj`` with no key bias, ``layer_scale{1,2}.lambda1``,
  ``mlp.up_proj|down_proj`` (gated: ``gate_proj|up_proj|down_proj``), ``norm``.

The family's intermediate names are Meta's, with the attention bias already effective and the
SwiGLU input projections fused: ``cls_token``, ``storage_tokens``, ``patch_embed.proj.*``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1|fc2 or mlp.w12|w3,
ls2.gamma}``, ``norm.*``. The key part of the fused qkv bias is always written as zeros: Meta
masks it (``bias_mask``) and transformers has none, and a bias added to every key shifts each
query's attention logits by a constant, which softmax ignores, so dropping it is exact. Meta's
RoPE periods are not copied: :class:`DINOv3` computes them from its base (100) in float32, as
transformers does; the file's (stored rounded to bfloat16) are checked against that base.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple, Union

import torch

from eomt_mm.models.backbones import DINOv3

from .common import (BackboneFamily, CheckpointConversionError, ConversionReport, StateDict,
                     check_fits_module, rename_key, unwrap_transformers)
from .vit import (backbone_rules, check_preset, count_blocks, rename_backbone,
                  swiglu_feedforward_channels)

__all__ = ['read_meta_dinov3', 'read_hf_dinov3', 'hf_dinov3_to_intermediate', 'infer_dinov3_arch',
           'inspect_dinov3', 'convert_dinov3', 'DINOV3_FAMILY', 'ROPE_BASE']

ROPE_BASE = 100.0
# Meta stores the periods in bfloat16 (8 mantissa bits): half a unit in the last place.
_PERIODS_RTOL = 2.0**-8

# Meta's token names -> DINOv3's (the blocks: eomt_mm.converters.vit). The MLP is fc1 / fc2,
# or w12 / w3 once the SwiGLU input projections are fused.
_TOKEN_RULES: List[Tuple[str, str]] = [
    (r'cls_token', 'cls_token'),
    (r'storage_tokens', 'register_tokens'),
]


def _zero_key_bias(bias: torch.Tensor) -> torch.Tensor:
    """The fused ``[q; k; v]`` bias with its key third set to zero (exact, see module doc)."""
    dims = bias.shape[0] // 3
    bias = bias.clone()
    bias[dims:2 * dims] = 0
    return bias


# ----------------------------------------------------------------------------- Meta layout
def read_meta_dinov3(sd: StateDict,
                     report: ConversionReport) -> Tuple[StateDict, Optional[StateDict]]:
    """Meta's hub layout -> (intermediate backbone weights, no decoder).

    Args:
        sd: The source state dict.
        report: Records the skipped pre-training tensors and the bias masking.

    Returns:
        ``(backbone weights, None)``; ``rope_embed.periods`` is kept (checked and dropped by
        :func:`inspect_dinov3` / :func:`convert_dinov3`).
    """
    if 'cls_token' not in sd or not any(k.startswith('blocks.') for k in sd):
        raise CheckpointConversionError('not a Meta DINOv3 checkpoint: needs cls_token and '
                                        f'blocks.*, found keys {sorted(sd)[:8]}...')
    if 'pos_embed' in sd:
        raise CheckpointConversionError(
            'this checkpoint has a learned pos_embed: it is DINOv2 (or another ViT), not DINOv3 '
            '(which uses RoPE); convert it with --format meta-dinov2')
    if 'cls_norm.weight' in sd:
        raise CheckpointConversionError(
            'this checkpoint has a separate cls_norm (untie_cls_and_patch_norms): DINOv3 here '
            'applies one final norm to every token, as all of Meta\'s hub models do')
    out: StateDict = {}
    for key, value in sd.items():
        if key == 'mask_token':
            report.skipped.append((key, 'DINOv3 pre-training only (iBOT masking)'))
        elif key.startswith('local_cls_norm.'):
            report.skipped.append((key, 'norm of the local-crop CLS token, used in pre-training '
                                        'only (SAT-493M ViT-L)'))
        elif key == 'rope_embed.periods':
            out[key] = value  # tells the head count; checked by inspect_dinov3
        elif key.endswith('.attn.qkv.bias_mask'):
            continue  # applied below with its bias
        elif key.endswith('.attn.qkv.bias'):
            mask = sd.get(key + '_mask')
            if mask is not None:
                if not bool(torch.isfinite(mask).all()):
                    raise CheckpointConversionError(f'{key}_mask holds NaN/inf (an '
                                                    'uninitialised mask): not a trained file')
                value = value * mask.to(value.dtype)
            out[key] = _zero_key_bias(value)
        elif re.fullmatch(r'blocks\.\d+\.mlp\.w[12]\.(weight|bias)', key):
            continue  # fused below
        else:
            out[key] = value
    report.notes.append('attn.qkv.bias: bias_mask applied, key part written as zeros')
    _fuse_swiglu(sd, out, r'blocks\.(\d+)\.mlp\.w(1|2)\.(weight|bias)',
                 lambda m: (f'blocks.{m.group(1)}.mlp.w12.{m.group(3)}', m.group(2)), ('1', '2'),
                 report, 'mlp.w1 / mlp.w2')
    return out, None


def _heads_from_periods(periods: torch.Tensor, embed_dims: int) -> int:
    """Check Meta's RoPE periods against base 100 and return the head count they imply."""
    count = periods.numel()
    if count == 0 or embed_dims % (4 * count):
        raise CheckpointConversionError(f'rope_embed.periods has {count} entries (heads of '
                                        f'{4 * count} channels), which does not divide the '
                                        f'width {embed_dims}')
    expected = ROPE_BASE**(torch.arange(count, dtype=torch.float64) / count)
    if not torch.allclose(periods.double().flatten(), expected, rtol=_PERIODS_RTOL, atol=0):
        raise CheckpointConversionError(
            f'rope_embed.periods {periods.flatten().tolist()[:4]}... are not the base-'
            f'{ROPE_BASE:g} periods {expected.tolist()[:4]}... (a min/max-period RoPE): DINOv3 '
            f'here computes base-{ROPE_BASE:g} periods and cannot load this model')
    return embed_dims // (4 * count)


def _fuse_swiglu(sd: StateDict, out: StateDict, pattern: str, target_of, order, report,
                 what: str) -> None:
    """Concatenate SwiGLU input projections ``[gate; up]`` into ``mlp.w12``."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.fullmatch(pattern, key)
        if m:
            target, part = target_of(m)
            parts.setdefault(target, {})[part] = value
    for target, found in parts.items():
        missing = [p for p in order if p not in found]
        if missing:
            raise CheckpointConversionError(f'{target}: SwiGLU projection(s) {missing} missing')
        # mmpretrain's SwiGLUFFNFused computes silu(first half) * second half of w12.
        out[target] = torch.cat([found[p] for p in order], dim=0)
    if parts:
        report.notes.append(f'fused {what} into ffn.w12 ([gate; up])')


# -------------------------------------------------------------------------- transformers
def hf_dinov3_to_intermediate(sd: StateDict, report: ConversionReport,
                              what: str = 'DINOv3ViTModel') -> StateDict:
    """transformers' DINOv3 names (``embeddings.*``, ``layer.{i}.*``, ``norm.*``) -> intermediate.

    Args:
        sd: Backbone weights with transformers' names (nothing outside the backbone).
        report: Records the skipped mask token and the fusions.
        what: Source name for errors.

    Returns:
        Intermediate backbone weights.
    """
    gated = any(re.fullmatch(r'layer\.\d+\.mlp\.gate_proj\.weight', k) for k in sd)
    down = 'w3' if gated else 'fc2'
    simple = [
        (r'embeddings\.cls_token', 'cls_token'),
        (r'embeddings\.register_tokens', 'storage_tokens'),
        (r'embeddings\.patch_embeddings\.(weight|bias)', r'patch_embed.proj.\1'),
        (r'layer\.(\d+)\.norm1\.(weight|bias)', r'blocks.\1.norm1.\2'),
        (r'layer\.(\d+)\.attention\.o_proj\.(weight|bias)', r'blocks.\1.attn.proj.\2'),
        (r'layer\.(\d+)\.layer_scale1\.lambda1', r'blocks.\1.ls1.gamma'),
        (r'layer\.(\d+)\.norm2\.(weight|bias)', r'blocks.\1.norm2.\2'),
        (r'layer\.(\d+)\.mlp\.down_proj\.(weight|bias)', rf'blocks.\1.mlp.{down}.\2'),
        (r'layer\.(\d+)\.layer_scale2\.lambda1', r'blocks.\1.ls2.gamma'),
        (r'norm\.(weight|bias)', r'norm.\1'),
    ]
    out: StateDict = {}
    projections: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == 'embeddings.mask_token':
            report.skipped.append((key, 'DINOv3 pre-training only (iBOT masking)'))
            continue
        if key.endswith('rope_embeddings.inv_freq'):
            report.skipped.append((key, 'RoPE frequencies, recomputed by the backbone'))
            continue
        m = re.fullmatch(r'layer\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)', key)
        if m:
            projections.setdefault(f'blocks.{m.group(1)}.attn.qkv', {})[
                f'{m.group(2)}.{m.group(3)}'] = value
            continue
        m = re.fullmatch(r'layer\.(\d+)\.mlp\.up_proj\.(weight|bias)', key)
        if m and not gated:
            out[f'blocks.{m.group(1)}.mlp.fc1.{m.group(2)}'] = value
            continue
        if re.fullmatch(r'layer\.\d+\.mlp\.(gate|up)_proj\.(weight|bias)', key):
            continue  # fused below
        new = rename_key(key, simple)
        if new is None:
            raise CheckpointConversionError(f'unexpected key {key!r} in a transformers {what} '
                                            'checkpoint')
        out[new] = value
    for prefix, parts in projections.items():
        missing = [f'{p}.weight' for p in 'qkv' if f'{p}.weight' not in parts]
        if missing:
            raise CheckpointConversionError(f'{prefix}: projection(s) {missing} missing')
        out[prefix + '.weight'] = torch.cat([parts[f'{p}.weight'] for p in 'qkv'], dim=0)
        if any(f'{p}.bias' in parts for p in 'qv'):  # no bias at all: 7B (qkv_bias=False)
            zeros = parts['q.weight'].new_zeros(parts['q.weight'].shape[0])
            out[prefix + '.bias'] = _zero_key_bias(torch.cat(
                [parts.get(f'{p}.bias', zeros) for p in 'qkv'], dim=0))
    report.notes.append('fused attention.{q,k,v}_proj into attn.qkv (key bias: zeros)')
    if gated:
        _fuse_swiglu(sd, out, r'layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)',
                     lambda m: (f'blocks.{m.group(1)}.mlp.w12.{m.group(3)}', m.group(2)),
                     ('gate', 'up'), report, 'mlp.gate_proj / mlp.up_proj')
    return out


def read_hf_dinov3(sd: StateDict,
                   report: ConversionReport) -> Tuple[StateDict, Optional[StateDict]]:
    """transformers ``DINOv3ViTModel`` -> (intermediate backbone weights, no decoder).

    Args:
        sd: The source state dict (``layer.{i}`` or, saved by transformers 5,
            ``model.layer.{i}``; an outer ``dinov3_vit.`` prefix is removed).
        report: Records the skipped tensors and the fusions.

    Returns:
        ``(backbone weights, None)``.
    """
    sd = unwrap_transformers(sd, 'dinov3_vit.', 'transformers DINOv3ViTModel')
    if any(k.startswith('embeddings.position_embeddings') for k in sd):
        raise CheckpointConversionError('this checkpoint has learned position embeddings: it is '
                                        'DINOv2, not DINOv3 (use --format timm or meta-dinov2)')
    sd = {re.sub(r'^model\.layer\.', 'layer.', k): v for k, v in sd.items()}
    return hf_dinov3_to_intermediate(sd, report), None


# ---------------------------------------------------------------- intermediate -> DINOv3
def infer_dinov3_arch(sd: StateDict) -> dict:
    """Infer the architecture (all but the head count) from intermediate-named weights.

    Args:
        sd: Intermediate backbone weights.

    Returns:
        ``embed_dims``, ``num_layers``, ``feedforward_channels``, ``ffn_type``,
        ``patch_size``, ``num_register_tokens``, ``in_channels``.
    """
    try:
        embed_dims = sd['cls_token'].shape[-1]
        kernel = sd['patch_embed.proj.weight']
        swiglu = 'blocks.0.mlp.w12.weight' in sd
        fc1 = sd['blocks.0.mlp.w12.weight' if swiglu else 'blocks.0.mlp.fc1.weight']
    except KeyError as exc:
        raise CheckpointConversionError(f'DINOv3 backbone weights incomplete: {exc} missing'
                                        ) from exc
    num_layers = count_blocks(sd, 'DINOv3')
    if kernel.ndim != 4 or kernel.shape[-1] != kernel.shape[-2]:
        raise CheckpointConversionError(f'bad patch kernel {tuple(kernel.shape)}')
    ffc = swiglu_feedforward_channels(fc1.shape[0] // 2) if swiglu else fc1.shape[0]
    reg = sd.get('storage_tokens')
    return dict(embed_dims=int(embed_dims), num_layers=num_layers,
                feedforward_channels=int(ffc), qkv_bias='blocks.0.attn.qkv.bias' in sd,
                ffn_type='swiglu_fused' if swiglu else 'origin',
                patch_size=int(kernel.shape[-1]), in_channels=int(kernel.shape[1]),
                num_register_tokens=int(reg.shape[1]) if reg is not None else 0)


def inspect_dinov3(sd: StateDict, report: ConversionReport, arch: Optional[str] = None) -> dict:
    """Infer the architecture and check it against the named :class:`DINOv3` preset.

    Args:
        sd: Intermediate backbone weights.
        report: Unused (the family interface passes it).
        arch: Preset name (a key of ``DINOv3.arch_zoo``) the weights must be; None: no check.

    Returns:
        :func:`infer_dinov3_arch`'s dict plus ``arch`` and ``num_heads``: from Meta's RoPE
        periods (checked against base 100) or the preset, None when neither tells.
    """
    info = infer_dinov3_arch(sd)
    periods = sd.get('rope_embed.periods')
    num_heads = None if periods is None else _heads_from_periods(periods, info['embed_dims'])
    if arch is not None:
        preset = check_preset(info, arch, DINOv3.arch_zoo, 'DINOv3', dict(
            embed_dims=None, num_layers=None, feedforward_channels=None, ffn_type='origin',
            qkv_bias=True))
        if num_heads is not None and num_heads != preset['num_heads']:
            raise CheckpointConversionError(f'checkpoint has {num_heads} heads (from its RoPE '
                                            f'periods), DINOv3-{arch} has {preset["num_heads"]}')
        num_heads = preset['num_heads']
    return dict(info, arch=arch, num_heads=num_heads)


def _check_against_model(ours: StateDict, info: dict) -> None:
    """Build DINOv3 on the meta device and require identical keys and shapes."""
    heads = info['num_heads'] or 1  # shapes do not depend on the head count
    with torch.device('meta'):
        model = DINOv3(arch=dict(embed_dims=info['embed_dims'], num_layers=info['num_layers'],
                                 num_heads=heads, feedforward_channels=info['feedforward_channels'],
                                 ffn_type=info['ffn_type'], qkv_bias=info['qkv_bias']),
                       patch_size=info['patch_size'], in_channels=info['in_channels'],
                       num_register_tokens=info['num_register_tokens'])
    check_fits_module(ours, model, 'converted backbone does not fit DINOv3', limit=20)


def convert_dinov3(sd: StateDict, info: dict, report: ConversionReport, patch_size: int,
                   img_size: Optional[Union[int, Tuple[int, int]]] = None
                   ) -> Tuple[StateDict, dict]:
    """Rename intermediate weights into ``backbone.``-prefixed :class:`DINOv3` keys.

    Args:
        sd: Intermediate backbone weights.
        info: :func:`inspect_dinov3`'s result.
        report: Records the mapping.
        patch_size: Must be the source's (16): DINOv3 is used at its native patch size.
        img_size: Must be None: there is no position table to resize.

    Returns:
        ``(state_dict, backbone meta)``.
    """
    if patch_size != info['patch_size']:
        raise CheckpointConversionError(f'DINOv3 is used at its native patch size '
                                        f'{info["patch_size"]}: drop --patch-size {patch_size}')
    if img_size is not None:
        raise CheckpointConversionError('DINOv3 has no position table to resize (RoPE adapts to '
                                        'every input size): drop --img-size')
    sd = dict(sd)
    if sd.pop('rope_embed.periods', None) is not None:
        report.skipped.append(('rope_embed.periods', f'base-{ROPE_BASE:g} RoPE periods (checked); '
                                                     'recomputed by the backbone in float32'))
    rules = backbone_rules(_TOKEN_RULES, '(?:fc1|w12)', '(?:fc2|w3)', info['ffn_type'])
    ours = rename_backbone(sd, rules, report, 'DINOv3')
    _check_against_model(ours, info)
    meta = dict(family='DINOv3', arch=info['arch'], num_heads=info['num_heads'],
                embed_dims=info['embed_dims'], num_layers=info['num_layers'],
                feedforward_channels=info['feedforward_channels'], ffn_type=info['ffn_type'],
                qkv_bias=info['qkv_bias'], patch_size=patch_size,
                num_register_tokens=info['num_register_tokens'], rope_base=ROPE_BASE)
    return {'backbone.' + k: v for k, v in ours.items()}, meta


#: The DINOv3 family (formats ``meta-dinov3``, ``hf-dinov3``, ``hf-eomt-dinov3``, ``eomt-dinov3``).
DINOV3_FAMILY = BackboneFamily(name='DINOv3', inspect=inspect_dinov3, convert=convert_dinov3)
