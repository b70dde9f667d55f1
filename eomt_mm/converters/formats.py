"""The table of source formats and the two entry points, :func:`convert_state_dict` and
:func:`convert_file`.

A conversion runs: the format's reader (source -> backbone weights in its family's intermediate
names, plus the decoder in the official EoMT names or None) -> the backbone family's ``inspect``
(architecture) and ``convert`` (resample, rename, check against the model) -> for full EoMT
checkpoints, :func:`~eomt_mm.converters.eomt.convert_eomt_decoder`.

Adding a format: write its reader (in the module of its family, e.g. a new
``eomt_mm/converters/<family>.py`` with a :class:`~eomt_mm.converters.common.BackboneFamily`
for a new backbone) and add one :class:`SourceFormat` row to :data:`FORMATS`;
``tools/convert_weights.py --format`` offers every row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

from .common import (FORMAT_VERSION, BackboneFamily, CheckpointConversionError,
                     ConversionReport, StateDict, load_source_state_dict, save_converted)
from .dinov2 import DINOV2_FAMILY, read_meta_dinov2, read_timm
from .dinov3 import DINOV3_FAMILY, read_hf_dinov3, read_meta_dinov3
from .eomt import convert_eomt_decoder, read_eomt, read_hf_eomt
from .eomt_dinov3 import read_eomt_dinov3, read_hf_eomt_dinov3

__all__ = ['SourceFormat', 'FORMATS', 'convert_state_dict', 'convert_file']

Reader = Callable[[StateDict, ConversionReport], Tuple[StateDict, Optional[StateDict]]]


@dataclass(frozen=True)
class SourceFormat:
    """One source format (a row of :data:`FORMATS`).

    Args:
        name: The ``--format`` value.
        read: ``read(state_dict, report) -> (backbone, decoder)``: the backbone weights in the
            family's intermediate names and the EoMT decoder in the official names (None for a
            backbone-only format).
        family: Converts the backbone weights.
        description: One line for ``--help``.
        needs_base: The source is a delta: ``read(state_dict, report, base)`` also takes the
            base weights it was trained from (``--base``).
    """
    name: str
    read: Reader
    family: BackboneFamily
    description: str
    needs_base: bool = False


#: Every supported source format, by ``--format`` name.
FORMATS: Dict[str, SourceFormat] = {f.name: f for f in (
    SourceFormat('meta-dinov2', read_meta_dinov2, DINOV2_FAMILY,
                 "Meta's DINOv2 hub files (dinov2_vit*14*_pretrain.pth)"),
    SourceFormat('timm', read_timm, DINOV2_FAMILY, 'timm vit_*_dinov2 weights'),
    SourceFormat('eomt', read_eomt, DINOV2_FAMILY,
                 'official EoMT (Lightning) checkpoints, github.com/tue-mps/eomt'),
    SourceFormat('hf-eomt', read_hf_eomt, DINOV2_FAMILY,
                 'Hugging Face EomtForUniversalSegmentation weights'),
    SourceFormat('meta-dinov3', read_meta_dinov3, DINOV3_FAMILY,
                 "Meta's DINOv3 hub files (dinov3_vit*16*_pretrain_*.pth)"),
    SourceFormat('hf-dinov3', read_hf_dinov3, DINOV3_FAMILY,
                 'Hugging Face DINOv3ViTModel weights (facebook/dinov3-vit*16-pretrain-*)'),
    SourceFormat('hf-eomt-dinov3', read_hf_eomt_dinov3, DINOV3_FAMILY,
                 'Hugging Face EomtDinov3ForUniversalSegmentation weights'),
    SourceFormat('eomt-dinov3', read_eomt_dinov3, DINOV3_FAMILY,
                 'official EoMT DINOv3 checkpoints (deltas over DINOv3: give --base)',
                 needs_base=True),
)}


def convert_state_dict(src: StateDict,
                       fmt: str,
                       patch_size: Optional[int] = None,
                       img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       arch: Optional[str] = None,
                       base: Optional[StateDict] = None
                       ) -> Tuple[StateDict, dict, ConversionReport]:
    """Convert a source state dict into this project's format.

    Args:
        src: Source state dict (already unwrapped, see :func:`load_source_state_dict`).
        fmt: One of :data:`FORMATS`.
        patch_size: Resample the patch kernel to this size (FlexiViT pseudo-inverse), e.g. 16 for
            EoMT from a 14-pixel DINOv2. None keeps the source's.
        img_size: Resize the position embedding to the grid ``img_size // patch_size`` (bicubic,
            anti-aliased like timm). None keeps the source grid (the model still resizes it at
            load time / per input).
        arch: Optional backbone preset name (DINOv2: ``'s'``, ``'b'``, ``'l'``, ``'g'``...) the
            checkpoint must be; also records the head count in the metadata.
        base: The base weights of a delta format (``needs_base``, e.g. ``eomt-dinov3``);
            must be None for every other format.

    Returns:
        ``(state_dict, meta, report)``.

    Raises:
        CheckpointConversionError: unknown format, unexpected or missing keys, bad shapes, or an
            architecture different from ``arch``.
    """
    if fmt not in FORMATS:
        raise CheckpointConversionError(f'unknown format {fmt!r}; expected one of '
                                        f'{tuple(FORMATS)}')
    source = FORMATS[fmt]
    report = ConversionReport()
    if source.needs_base:
        backbone_src, decoder_src = source.read(src, report, base)
    elif base is not None:
        raise CheckpointConversionError(
            f'--base is for the delta formats ({[n for n, f in FORMATS.items() if f.needs_base]}) '
            f'only; {fmt!r} checkpoints hold complete weights: drop --base')
    else:
        backbone_src, decoder_src = source.read(src, report)
    info = source.family.inspect(backbone_src, report, arch)
    src_patch = info['patch_size']
    new_patch = patch_size or src_patch
    if decoder_src is not None and new_patch != src_patch:
        raise CheckpointConversionError(
            f'cannot change the patch size of a full EoMT checkpoint ({src_patch} -> {new_patch}): '
            'its upscaler and heads were trained for the original patch size')
    state_dict, backbone_meta = source.family.convert(backbone_src, info, report, new_patch,
                                                      img_size)
    meta = dict(format_version=FORMAT_VERSION, source_format=fmt, backbone=backbone_meta)
    if decoder_src is not None:
        decoder_sd, meta['decoder'] = convert_eomt_decoder(decoder_src, report,
                                                           info['embed_dims'], new_patch)
        state_dict.update(decoder_sd)
    return state_dict, meta, report


def convert_file(src_path: str,
                 dst_path: str,
                 fmt: str,
                 patch_size: Optional[int] = None,
                 img_size: Optional[Union[int, Tuple[int, int]]] = None,
                 arch: Optional[str] = None,
                 log: Callable[[str], None] = print,
                 base_path: Optional[str] = None) -> Tuple[dict, ConversionReport]:
    """Load ``src_path``, convert it (see :func:`convert_state_dict`) and save to ``dst_path``.

    Args:
        src_path: Source checkpoint (``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors``).
        dst_path: Output file, written atomically.
        fmt: One of :data:`FORMATS`.
        patch_size: See :func:`convert_state_dict`.
        img_size: See :func:`convert_state_dict`.
        arch: See :func:`convert_state_dict`.
        log: Receives the report and a summary line.
        base_path: Base weights file of a delta format (``--base``), read like ``src_path``.

    Returns:
        ``(meta, report)``.
    """
    src = load_source_state_dict(src_path)
    base = load_source_state_dict(base_path) if base_path is not None else None
    state_dict, meta, report = convert_state_dict(src, fmt, patch_size=patch_size,
                                                  img_size=img_size, arch=arch, base=base)
    meta['source'] = os.path.basename(src_path)
    if base_path is not None:
        meta['base'] = os.path.basename(base_path)
    save_converted(dst_path, state_dict, meta)
    log(report.format())
    log(f'wrote {len(state_dict)} tensors to {dst_path} ({meta["backbone"]})')
    return meta, report
