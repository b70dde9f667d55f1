"""EoMT on DINOv3: transformers' layout and the reference's delta checkpoints -> our EoMT.

Source layouts:

* ``hf-eomt-dinov3``: transformers ``EomtDinov3ForUniversalSegmentation``
  (``models/eomt_dinov3/modeling_eomt_dinov3.py``): the DINOv3 backbone under
  ``embeddings.*`` / ``layers.{i}.*`` / ``layernorm.*`` (``attention.{q,k,v,o}_proj``, no key
  bias) and the EoMT head as in ``hf-eomt``: ``query.weight``, ``class_predictor``,
  ``mask_head.fc{1,2,3}``, ``upscale_block.block.{i}``, ``attn_mask_probs``.
* ``eomt-dinov3``: the reference's DINOv3 checkpoints (github.com/tue-mps/eomt, model zoo
  ``model_zoo/dinov3.md``, e.g. ``ade20k_semantic_eomt_large_512_dinov3/pytorch_model.bin``).
  They are deltas (``delta_weights: True`` in its configs): its ``LightningModule`` builds the
  network with the DINOv3 weights (transformers' ``DINOv3ViTModel`` as
  ``network.encoder.backbone`` with ``patch_embed`` = ``embeddings`` and ``blocks`` = ``layer``),
  zeroes every parameter outside ``network.encoder.`` (``_zero_init_outside_encoder``) and loads
  ``state_dict() + checkpoint`` key by key (``_add_state_dicts``), ``criterion.empty_weight``
  left out. So the trained weight is ``base + delta`` in the backbone, ``delta`` for the
  queries and heads, and ``initial value + delta`` for the buffers: ``attn_mask_probs`` starts
  at ones, ``pixel_mean`` / ``pixel_std`` at ImageNet's statistics. The base file (``--base``)
  is the DINOv3 backbone in Meta's or transformers' layout (told apart by its keys).

Both readers return the backbone in the DINOv3 family's intermediate names
(:mod:`eomt_mm.converters.dinov3`) and the decoder in the official EoMT names, which
:func:`eomt_mm.converters.eomt.convert_eomt_decoder` maps and checks.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import torch

from .common import (CheckpointConversionError, ConversionReport, StateDict, rename_key,
                     unwrap_transformers)
from .dinov3 import (hf_dinov3_to_intermediate, infer_dinov3_arch, read_hf_dinov3,
                     read_meta_dinov3)
from .eomt import HF_DECODER_RULES, IMAGENET_MEAN, IMAGENET_STD, LOSS_BUFFER

__all__ = ['read_hf_eomt_dinov3', 'read_dinov3_base', 'read_eomt_dinov3']

# The reference's DINOv3 backbone (a renamed DINOv3ViTModel) -> transformers' own names.
_DELTA_BACKBONE_RULES = [
    (r'patch_embed\.(.*)', r'embeddings.\1'),
    (r'blocks\.(\d+)\.(.*)', r'layer.\1.\2'),
    (r'norm\.(weight|bias)', r'norm.\1'),
    (r'rope_embeddings\.(.*)', r'rope_embeddings.\1'),
]
_BACKBONE_PREFIX = 'network.encoder.backbone.'
# |delta| of the normalisation buffers that still counts as "unchanged" (the reference keeps
# them fixed; a delta file stores them as float32 differences of equal values).
_BUFFER_ATOL = 1e-6


def read_hf_eomt_dinov3(sd: StateDict,
                        report: ConversionReport) -> Tuple[StateDict, Optional[StateDict]]:
    """transformers ``EomtDinov3ForUniversalSegmentation`` -> (backbone, canonical decoder).

    Args:
        sd: The source state dict (optionally under ``model.``).
        report: Records the skipped loss buffers and the fusions.

    Returns:
        ``(intermediate backbone weights, decoder weights in the official EoMT names)``.
    """
    sd = unwrap_transformers(sd, 'model.', 'transformers EoMT-DINOv3')
    if any(k.startswith('embeddings.position_embeddings') for k in sd):
        raise CheckpointConversionError('this checkpoint has learned position embeddings: it is '
                                        'EomtForUniversalSegmentation on DINOv2, use --format '
                                        'hf-eomt')
    backbone, decoder = {}, {}
    for key, value in sd.items():
        if key.startswith('criterion.'):
            report.skipped.append((key, LOSS_BUFFER))
        elif key.startswith(('embeddings.', 'rope_embeddings.')):
            backbone[key] = value
        elif re.match(r'layers\.\d+\.', key):
            backbone['layer.' + key[len('layers.'):]] = value
        elif key.startswith('layernorm.'):
            backbone['norm.' + key[len('layernorm.'):]] = value
        elif (name := rename_key(key, HF_DECODER_RULES)) is not None:
            decoder[name] = value
        else:
            raise CheckpointConversionError(f'unexpected key {key!r} in a transformers '
                                            'EoMT-DINOv3 checkpoint')
    if any(k.endswith('mlp.gate_proj.weight') for k in backbone):
        report.notes.append('gated MLP: this project computes SiLU in the SwiGLU and GELU in the '
                            "EoMT heads (as the reference); transformers' EomtDinov3 applies "
                            'its config.hidden_act to both')
    return hf_dinov3_to_intermediate(backbone, report,
                                     'EomtDinov3ForUniversalSegmentation'), decoder


def _split_delta(sd: StateDict, report: ConversionReport) -> Tuple[StateDict, StateDict]:
    """A reference delta -> (backbone in transformers' names, decoder in official names)."""
    if not any(k.startswith(_BACKBONE_PREFIX + 'patch_embed.') for k in sd):
        hint = (' (timm backbone names: a DINOv2 EoMT checkpoint, use --format eomt)'
                if _BACKBONE_PREFIX + 'cls_token' in sd else '')
        raise CheckpointConversionError(
            f"not a reference EoMT-DINOv3 checkpoint: no '{_BACKBONE_PREFIX}patch_embed.*' "
            f'keys{hint} (found {sorted(sd)[:6]}...)')
    backbone, decoder = {}, {}
    for key, value in sd.items():
        if key.startswith(_BACKBONE_PREFIX):
            name = rename_key(key[len(_BACKBONE_PREFIX):], _DELTA_BACKBONE_RULES)
            if name is None:
                raise CheckpointConversionError(f'unexpected backbone key {key!r} in a reference '
                                                'EoMT-DINOv3 checkpoint')
            backbone[name] = value
        elif key in ('network.encoder.pixel_mean', 'network.encoder.pixel_std'):
            initial = IMAGENET_MEAN if key.endswith('mean') else IMAGENET_STD
            if value.numel() != 3 or float(value.abs().max()) > _BUFFER_ATOL:
                raise CheckpointConversionError(
                    f'{key} delta = {value.flatten().tolist()}: the normalisation differs from '
                    f'ImageNet {initial} (initial value + delta); normalisation lives in the '
                    "config's data_preprocessor here and this checkpoint needs a matching one")
            report.skipped.append((key, f'normalisation delta 0 (ImageNet {initial}; x255 in '
                                        'the SegDataPreProcessor)'))
        elif key.startswith('criterion.'):
            report.skipped.append((key, LOSS_BUFFER))
        elif key.startswith('network.'):
            decoder[key[len('network.'):]] = value
        else:
            raise CheckpointConversionError(f'unexpected key {key!r} in a reference EoMT-DINOv3 '
                                            'checkpoint')
    return backbone, decoder


def read_dinov3_base(sd: StateDict, report: ConversionReport) -> StateDict:
    """A DINOv3 backbone file in either layout (told apart by its keys) -> intermediate names.

    Args:
        sd: Meta hub or transformers ``DINOv3ViTModel`` weights.
        report: Records what the reader skipped.

    Returns:
        Intermediate weights.

    Raises:
        CheckpointConversionError: For a file of neither layout (e.g. DINOv2).
    """
    if any(k.startswith(('embeddings.', 'dinov3_vit.embeddings.')) for k in sd):
        return read_hf_dinov3(sd, report)[0]
    if 'storage_tokens' in sd or 'rope_embed.periods' in sd:
        return read_meta_dinov3(sd, report)[0]
    kind = 'a DINOv2 file' if 'pos_embed' in sd or 'reg_token' in sd else 'not DINOv3'
    raise CheckpointConversionError(
        f'the base file is {kind} (keys {sorted(sd)[:6]}...): give the DINOv3 weights the '
        'EoMT checkpoint was trained from, Meta\'s dinov3_vit*16_pretrain_lvd1689m-*.pth or '
        'the model.safetensors of facebook/dinov3-vit*16-pretrain-lvd1689m')


def _describe(info: dict) -> str:
    return (f"{info['num_layers']} layers, width {info['embed_dims']}, {info['ffn_type']} FFN "
            f"{info['feedforward_channels']}, {info['num_register_tokens']} registers")


def read_eomt_dinov3(sd: StateDict, report: ConversionReport,
                     base: Optional[StateDict] = None) -> Tuple[StateDict, Optional[StateDict]]:
    """The reference's delta checkpoint + its DINOv3 base -> (backbone, canonical decoder).

    Args:
        sd: The delta state dict (``network.*``, ``criterion.*``).
        report: Records the skipped tensors, the base's conversion and the additions.
        base: The DINOv3 backbone the delta was trained from, Meta's or transformers' layout.

    Returns:
        ``(intermediate backbone weights = base + delta, decoder weights in the official EoMT
        names)``.

    Raises:
        CheckpointConversionError: No base, a base of another architecture (or not DINOv3), keys
            or shapes that differ between delta and base, or ``attn_mask_probs`` outside [0, 1].
    """
    backbone_delta, decoder_delta = _split_delta(sd, report)
    if base is None:
        raise CheckpointConversionError(
            'eomt-dinov3 checkpoints are deltas over the DINOv3 weights: pass those with --base '
            "(Meta's dinov3_vitl16_pretrain_lvd1689m-*.pth or the model.safetensors of "
            'facebook/dinov3-vitl16-pretrain-lvd1689m for the EoMT-L checkpoints; vits16 / '
            'vitb16 for EoMT-S / B)')
    delta = hf_dinov3_to_intermediate(backbone_delta, report, 'EoMT-DINOv3 (delta)')
    base_report = ConversionReport()
    full = read_dinov3_base(base, base_report)
    report.skipped += [(f'--base {k}', why) for k, why in base_report.skipped]
    delta_info, base_info = infer_dinov3_arch(delta), infer_dinov3_arch(full)
    if _describe(delta_info) != _describe(base_info):
        raise CheckpointConversionError(
            f'the --base file is DINOv3 with {_describe(base_info)}, but the delta was trained '
            f'on {_describe(delta_info)}: pass the DINOv3 weights of the same size')
    periods = full.pop('rope_embed.periods', None)  # Meta's; checked by the family's inspect
    missing, unexpected = sorted(set(full) - set(delta)), sorted(set(delta) - set(full))
    shapes = [f'{k}: base {tuple(full[k].shape)} vs delta {tuple(delta[k].shape)}'
              for k in sorted(set(full) & set(delta)) if full[k].shape != delta[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointConversionError(
            'the delta does not fit the --base file' + (f'; only in base: {missing[:10]}' if
                                                        missing else '')
            + (f'; only in delta: {unexpected[:10]}' if unexpected else '')
            + (f'; shapes: {shapes[:10]}' if shapes else ''))
    for key, value in delta.items():
        dtype = torch.promote_types(full[key].dtype, value.dtype)
        full[key] = (full[key].float() + value.float()).to(dtype)
    if periods is not None:
        full['rope_embed.periods'] = periods
    report.notes.append(f'backbone = --base + delta ({len(delta)} tensors); queries and heads = '
                        'delta (zero-initialised in the reference); attn_mask_probs = 1 + delta')

    decoder = {k: v.float() for k, v in decoder_delta.items()}
    if 'attn_mask_probs' in decoder:
        probs = 1.0 + decoder['attn_mask_probs']
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise CheckpointConversionError(
                f'attn_mask_probs = 1 + delta = {probs.tolist()} lies outside [0, 1]: this file '
                'is not a delta in the reference\'s layout (a full checkpoint? try --format '
                'eomt)')
        decoder['attn_mask_probs'] = probs
    return full, decoder
