"""EoMT checkpoints: the official (Lightning) layout and Hugging Face's -> this project's EoMT.

Source layouts:

* ``eomt``: official EoMT (Lightning) checkpoints (github.com/tue-mps/eomt): prefix
  ``network.``, backbone under ``encoder.backbone.`` (timm names), ``q.weight``, ``class_head``,
  ``mask_head.{0,2,4}``, ``upscale.{i}.conv1|conv2|norm``, ``attn_mask_probs``.
* ``hf-eomt``: Hugging Face ``EomtForUniversalSegmentation`` (transformers,
  ``models/eomt/modeling_eomt.py``): ``embeddings.*``, separate ``attention.{q,k,v}_proj``
  (fused here into ``qkv``), ``layer_scale{1,2}.lambda1``, ``layernorm``, ``query.weight``,
  ``class_predictor``, ``mask_head.fc{1,2,3}``, ``upscale_block.block.{i}``.

Both readers return the backbone in timm names (converted by the DINOv2 family,
:mod:`eomt_mm.converters.dinov2`) and the decoder in the official names ("canonical"), which
:data:`DECODER_KEY_MAP` maps onto this project's decoder; the result is checked against an
:class:`~eomt_mm.models.decode_heads.EoMTDecoder` built on the ``meta`` device, so a rename
there shows up here.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Tuple

import torch

from eomt_mm.models.decode_heads import EoMTDecoder

from .common import (CheckpointConversionError, ConversionReport, StateDict, check_fits_module,
                     rename_key, rename_keys, unwrap_transformers)

__all__ = ['DECODER_KEY_MAP', 'HF_DECODER_RULES', 'IMAGENET_MEAN', 'IMAGENET_STD',
           'LOSS_BUFFER', 'read_eomt', 'read_hf_eomt', 'convert_eomt_decoder']

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Why the ``criterion.*`` tensors of a training checkpoint are skipped.
LOSS_BUFFER = 'loss buffer, rebuilt from the loss config'

# ---------------------------------------------------------------------------------------------
# EoMT decoder key table: canonical (official EoMT, without ``network.``) -> this project's keys.
# The targets are the state_dict names of eomt_mm.models.segmentors.EoMT, whose `decoder`
# attribute is an eomt_mm.models.decode_heads.EoMTDecoder. Conversion builds that decoder and
# refuses to write a file whose decoder keys or shapes differ, so a rename there shows up here.
# Patterns are full-match regexes; ``{i}`` groups are substituted positionally.
# ---------------------------------------------------------------------------------------------
DECODER_KEY_MAP: List[Tuple[str, str]] = [
    (r'q\.weight', 'decoder.q.weight'),
    (r'class_head\.(weight|bias)', r'decoder.class_head.\1'),
    (r'mask_head\.(0|2|4)\.(weight|bias)', r'decoder.mask_head.\1.\2'),
    (r'upscale\.(\d+)\.conv1\.(weight|bias)', r'decoder.upscale.\1.conv1.\2'),
    (r'upscale\.(\d+)\.conv2\.weight', r'decoder.upscale.\1.conv2.weight'),
    (r'upscale\.(\d+)\.norm\.(weight|bias)', r'decoder.upscale.\1.norm.\2'),
    (r'attn_mask_probs', 'decoder.attn_mask_probs'),
]
#: transformers' EoMT head names (on DINOv2 and on DINOv3 alike) -> the official (canonical)
#: names.
HF_DECODER_RULES: List[Tuple[str, str]] = [
    (r'query\.weight', 'q.weight'),
    (r'class_predictor\.(weight|bias)', r'class_head.\1'),
    (r'mask_head\.fc1\.(weight|bias)', r'mask_head.0.\1'),
    (r'mask_head\.fc2\.(weight|bias)', r'mask_head.2.\1'),
    (r'mask_head\.fc3\.(weight|bias)', r'mask_head.4.\1'),
    (r'upscale_block\.block\.(\d+)\.conv1\.(weight|bias)', r'upscale.\1.conv1.\2'),
    (r'upscale_block\.block\.(\d+)\.conv2\.weight', r'upscale.\1.conv2.weight'),
    (r'upscale_block\.block\.(\d+)\.layernorm2d\.(weight|bias)', r'upscale.\1.norm.\2'),
    (r'attn_mask_probs', 'attn_mask_probs'),
]


def read_eomt(sd: StateDict, report: ConversionReport) -> Tuple[StateDict, Optional[StateDict]]:
    """Official EoMT -> (timm backbone dict, canonical decoder dict).

    Args:
        sd: The source state dict (``network.*``, ``criterion.*``).
        report: Records the skipped normalisation and loss buffers.

    Returns:
        ``(backbone weights, decoder weights)``.
    """
    if not any(k.startswith('network.') for k in sd):
        raise CheckpointConversionError("not an official EoMT checkpoint: no 'network.' keys "
                                        f'(found {sorted(sd)[:8]}...)')
    backbone, decoder = {}, {}
    for key, value in sd.items():
        if key.startswith('network.encoder.backbone.'):
            backbone[key[len('network.encoder.backbone.'):]] = value
        elif key in ('network.encoder.pixel_mean', 'network.encoder.pixel_std'):
            expected = IMAGENET_MEAN if key.endswith('mean') else IMAGENET_STD
            values = tuple(round(float(v), 4) for v in value.flatten())
            if values != tuple(round(v, 4) for v in expected):
                raise CheckpointConversionError(
                    f'{key} = {values} differs from ImageNet {expected}: normalisation lives in '
                    f"the config's data_preprocessor here; this checkpoint needs a matching one")
            report.skipped.append((key, f'normalisation {values} (x255) belongs to the '
                                        'SegDataPreProcessor'))
        elif key.startswith('network.'):
            decoder[key[len('network.'):]] = value
        elif key.startswith('criterion.'):
            report.skipped.append((key, LOSS_BUFFER))
        else:
            raise CheckpointConversionError(f'unexpected key {key!r} in an EoMT checkpoint')
    return backbone, decoder


def read_hf_eomt(sd: StateDict,
                 report: ConversionReport) -> Tuple[StateDict, Optional[StateDict]]:
    """HF EomtForUniversalSegmentation -> (timm backbone dict, canonical decoder dict).

    Args:
        sd: The source state dict (optionally under ``model.``).
        report: Records the skipped loss buffers and the fused projections.

    Returns:
        ``(backbone weights, decoder weights)``.
    """
    sd = unwrap_transformers(sd, 'model.', 'Hugging Face EoMT')
    backbone, decoder = {}, {}
    fused: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    simple = [
        (r'embeddings\.cls_token', 'cls_token'),
        (r'embeddings\.register_tokens', 'reg_token'),
        (r'embeddings\.patch_embeddings\.projection\.(weight|bias)', r'patch_embed.proj.\1'),
        (r'layers\.(\d+)\.norm1\.(weight|bias)', r'blocks.\1.norm1.\2'),
        (r'layers\.(\d+)\.attention\.out_proj\.(weight|bias)', r'blocks.\1.attn.proj.\2'),
        (r'layers\.(\d+)\.layer_scale1\.lambda1', r'blocks.\1.ls1.gamma'),
        (r'layers\.(\d+)\.norm2\.(weight|bias)', r'blocks.\1.norm2.\2'),
        (r'layers\.(\d+)\.mlp\.fc1\.(weight|bias)', r'blocks.\1.mlp.fc1.\2'),
        (r'layers\.(\d+)\.mlp\.fc2\.(weight|bias)', r'blocks.\1.mlp.fc2.\2'),
        (r'layers\.(\d+)\.mlp\.down_proj\.(weight|bias)', r'blocks.\1.mlp.fc2.\2'),
        (r'layers\.(\d+)\.layer_scale2\.lambda1', r'blocks.\1.ls2.gamma'),
        (r'layernorm\.(weight|bias)', r'norm.\1'),
    ]
    for key, value in sd.items():
        if key == 'embeddings.position_embeddings.weight':
            backbone['pos_embed'] = value[None]  # nn.Embedding [N, C] -> [1, N, C]
            continue
        if key.startswith('criterion.'):
            report.skipped.append((key, LOSS_BUFFER))
            continue
        m = re.fullmatch(r'layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)', key)
        if m:  # fused below in q, k, v order (timm / mmpretrain qkv layout)
            fused.setdefault((f'blocks.{m.group(1)}.attn.qkv.{m.group(3)}', 'qkv'), {})[
                m.group(2)] = value
            continue
        m = re.fullmatch(r'layers\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)', key)
        if m:  # SwiGLU: w12 = [gate; up] because the FFN computes silu(first half) * second half
            fused.setdefault((f'blocks.{m.group(1)}.mlp.fc1.{m.group(3)}', 'swiglu'), {})[
                m.group(2)] = value
            continue
        new = rename_key(key, simple)
        if new is not None:
            backbone[new] = value
            continue
        new = rename_key(key, HF_DECODER_RULES)
        if new is None:
            raise CheckpointConversionError(f'unexpected key {key!r} in a Hugging Face EoMT '
                                            'checkpoint')
        decoder[new] = value
    for (target, kind), parts in fused.items():
        order = ('q', 'k', 'v') if kind == 'qkv' else ('gate', 'up')
        missing = [p for p in order if p not in parts]
        if missing:
            raise CheckpointConversionError(f'{target}: missing {missing} projection(s) to fuse')
        backbone[target] = torch.cat([parts[p] for p in order], dim=0)
    report.notes.append('fused attention.{q,k,v}_proj into attn.qkv'
                        + (' and mlp.{gate,up}_proj into ffn.w12' if any(
                            k == 'swiglu' for _, k in fused) else ''))
    return backbone, decoder


def _check_decoder_against_model(decoder_sd: StateDict, info: dict, embed_dims: int,
                                 patch_size: int) -> None:
    """Build EoMTDecoder on the meta device and require the mapped keys and shapes to match."""
    with torch.device('meta'):
        decoder = EoMTDecoder(num_classes=info['num_classes'], embed_dims=embed_dims,
                              patch_size=patch_size, num_queries=info['num_queries'],
                              num_blocks=info['num_blocks'])
    check_fits_module(decoder_sd, decoder,
                      'converted decoder does not fit EoMTDecoder (fix DECODER_KEY_MAP)',
                      key_prefix='decoder.')


def _decoder_meta(canonical: StateDict, embed_dims: int, patch_size: int) -> dict:
    """Validate the decoder tensors' shapes and describe them (num queries, classes, blocks)."""
    needed = ['q.weight', 'class_head.weight', 'class_head.bias', 'attn_mask_probs']
    needed += [f'mask_head.{i}.{p}' for i in (0, 2, 4) for p in ('weight', 'bias')]
    missing = [k for k in needed if k not in canonical]
    upscale_ids = sorted({int(m.group(1)) for k in canonical
                          if (m := re.match(r'upscale\.(\d+)\.', k))})
    num_upscale = max(1, int(math.log2(patch_size)) - 2)
    if upscale_ids != list(range(num_upscale)):
        missing.append(f'upscale blocks 0..{num_upscale - 1} for patch {patch_size} '
                       f'(found {upscale_ids})')
    for i in range(num_upscale):
        missing += [k for k in (f'upscale.{i}.conv1.weight', f'upscale.{i}.conv1.bias',
                                f'upscale.{i}.conv2.weight', f'upscale.{i}.norm.weight',
                                f'upscale.{i}.norm.bias') if k not in canonical]
    if missing:
        raise CheckpointConversionError(f'EoMT decoder incomplete; missing: {missing}')
    d = embed_dims
    q = canonical['q.weight']
    num_classes = canonical['class_head.weight'].shape[0] - 1
    expected = {'q.weight': (q.shape[0], d), 'class_head.weight': (num_classes + 1, d),
                'class_head.bias': (num_classes + 1,),
                'attn_mask_probs': (canonical['attn_mask_probs'].numel(),)}
    for i in (0, 2, 4):
        expected[f'mask_head.{i}.weight'] = (d, d)
        expected[f'mask_head.{i}.bias'] = (d,)
    for i in range(num_upscale):
        expected.update({f'upscale.{i}.conv1.weight': (d, d, 2, 2),
                         f'upscale.{i}.conv1.bias': (d,),
                         f'upscale.{i}.conv2.weight': (d, 1, 3, 3),
                         f'upscale.{i}.norm.weight': (d,), f'upscale.{i}.norm.bias': (d,)})
    bad = [f'{k}: {tuple(canonical[k].shape)} vs {v}' for k, v in expected.items()
           if tuple(canonical[k].shape) != v]
    if bad:
        raise CheckpointConversionError(f'EoMT decoder shapes do not fit embed_dims {d}: {bad}')
    return dict(num_queries=int(q.shape[0]), num_classes=int(num_classes),
                num_blocks=int(canonical['attn_mask_probs'].numel()), num_upscale=num_upscale)


def convert_eomt_decoder(canonical: StateDict, report: ConversionReport, embed_dims: int,
                         patch_size: int) -> Tuple[StateDict, dict]:
    """Validate, rename (:data:`DECODER_KEY_MAP`) and check the canonical decoder weights.

    Args:
        canonical: Decoder weights in the official EoMT names (without ``network.``).
        report: Records the mapping (and masked attention still active at save time).
        embed_dims: The backbone's width.
        patch_size: The backbone's patch size (fixes the number of upscale blocks).

    Returns:
        ``(decoder state dict, decoder meta)``; meta has ``num_queries``, ``num_classes``,
        ``num_blocks``, ``num_upscale``.
    """
    meta = _decoder_meta(canonical, embed_dims, patch_size)
    decoder_sd, unexpected = rename_keys(canonical, DECODER_KEY_MAP, report)
    if unexpected:
        raise CheckpointConversionError(f'unexpected EoMT decoder keys: {unexpected[:20]}')
    _check_decoder_against_model(decoder_sd, meta, embed_dims, patch_size)
    probs = canonical['attn_mask_probs']
    if bool((probs > 0).any()):
        report.notes.append(f'attn_mask_probs = {probs.tolist()}: masked attention was '
                            'still active when this checkpoint was saved (fine for resuming '
                            'training)')
    return decoder_sd, meta
