"""What the DINOv2 and DINOv3 backbone families share: the project's ViT names and checks.

Both families' intermediate names follow the ViT layout timm and Meta's hub files use
(``patch_embed.proj``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.*,
ls2.gamma}``, ``norm``), and both backbones of this project
(:class:`~eomt_mm.models.backbones.DINOv2`, :class:`~eomt_mm.models.backbones.DINOv3`) name
their weights the mmpretrain way (``patch_embed.projection``, ``layers.{i}.{ln1, attn.qkv,
attn.proj, attn.gamma1, ln2, ffn.*, ffn.gamma2}``, ``ln1``). A family module states only its
tokens, its MLP names and its model; this module holds the rest.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Sequence, Tuple

from .common import CheckpointConversionError, ConversionReport, StateDict, rename_keys

__all__ = ['backbone_rules', 'count_blocks', 'swiglu_feedforward_channels', 'check_preset',
           'rename_backbone']

# Intermediate -> project names of everything but the tokens and the MLP projections.
_BLOCK_RULES: List[Tuple[str, str]] = [
    (r'patch_embed\.proj\.(weight|bias)', r'patch_embed.projection.\1'),
    (r'blocks\.(\d+)\.norm1\.(weight|bias)', r'layers.\1.ln1.\2'),
    (r'blocks\.(\d+)\.attn\.qkv\.(weight|bias)', r'layers.\1.attn.qkv.\2'),
    (r'blocks\.(\d+)\.attn\.proj\.(weight|bias)', r'layers.\1.attn.proj.\2'),
    (r'blocks\.(\d+)\.ls1\.gamma', r'layers.\1.attn.gamma1.weight'),
    (r'blocks\.(\d+)\.norm2\.(weight|bias)', r'layers.\1.ln2.\2'),
    (r'blocks\.(\d+)\.ls2\.gamma', r'layers.\1.ffn.gamma2.weight'),
    (r'norm\.(weight|bias)', r'ln1.\1'),
]
# The two MLP projections in mmpretrain's FFN (``origin``) and SwiGLUFFNFused.
_FFN_NAMES: Dict[str, Tuple[str, str]] = {'origin': ('layers.0.0', 'layers.1'),
                                          'swiglu_fused': ('w12', 'w3')}


def backbone_rules(token_rules: Sequence[Tuple[str, str]], fc1: str, fc2: str,
                   ffn_type: str) -> List[Tuple[str, str]]:
    """The full intermediate -> project rename table of one family.

    Args:
        token_rules: The family's rules for its tokens (and position table), full-match regexes.
        fc1: Regex of the family's name of the first MLP projection (``'fc1'``), matched in
            ``blocks.{i}.mlp.<fc1>.(weight|bias)``.
        fc2: Likewise for the second (``'fc2'``).
        ffn_type: ``'origin'`` or ``'swiglu_fused'``: which project names the MLP gets.

    Returns:
        ``(pattern, replacement)`` pairs for :func:`rename_backbone`.
    """
    first, second = _FFN_NAMES[ffn_type]
    return list(token_rules) + _BLOCK_RULES + [
        (rf'blocks\.(\d+)\.mlp\.{fc1}\.(weight|bias)', rf'layers.\1.ffn.{first}.\2'),
        (rf'blocks\.(\d+)\.mlp\.{fc2}\.(weight|bias)', rf'layers.\1.ffn.{second}.\2'),
    ]


def count_blocks(state_dict: StateDict, family: str) -> int:
    """The number of ``blocks.{i}.`` in intermediate weights, whose indices must be 0..n-1.

    Args:
        state_dict: Intermediate backbone weights.
        family: Named in the error (``'DINOv2'``).

    Returns:
        The block count.
    """
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r'blocks\.(\d+)\.', k))}
    if layer_ids != set(range(len(layer_ids))):
        raise CheckpointConversionError(f'{family} backbone block indices are not contiguous: '
                                        f'{sorted(layer_ids)}')
    return len(layer_ids)


def swiglu_feedforward_channels(hidden: int) -> int:
    """The ``feedforward_channels`` that mmpretrain's SwiGLUFFNFused turns into ``hidden``.

    SwiGLUFFNFused makes its hidden width ``int(channels * 2 / 3)`` rounded up to a multiple
    of 8, so the checkpoint's width is inverted here (Meta's ``ffn_ratio * C``).

    Args:
        hidden: The hidden width of the checkpoint's SwiGLU (half of ``w12``'s rows).

    Returns:
        The constructor value.
    """
    channels = math.ceil(hidden * 3 / 2)
    if (int(channels * 2 / 3) + 7) // 8 * 8 != hidden:
        raise CheckpointConversionError(f'SwiGLU hidden width {hidden} cannot be expressed by '
                                        'SwiGLUFFNFused (a multiple of 8 is needed)')
    return channels


def check_preset(info: dict, arch: str, arch_zoo: Dict[str, dict], family: str,
                 defaults: Dict[str, object]) -> dict:
    """Require the inferred architecture to be the named preset of the family's ``arch_zoo``.

    Args:
        info: The inferred architecture.
        arch: The preset name (``--arch``), case-insensitive.
        arch_zoo: The backbone class's presets.
        family: Named in the errors (``'DINOv2'``).
        defaults: The fields compared, in order, each with the value a preset that omits it
            has (None for the fields every preset states).

    Returns:
        The preset.

    Raises:
        CheckpointConversionError: For an unknown name or a checkpoint of another size.
    """
    key = arch.lower()
    if key not in arch_zoo:
        raise CheckpointConversionError(f'unknown --arch {arch!r} for {family}; expected one of '
                                        f'{sorted(arch_zoo)}')
    preset = arch_zoo[key]
    want = {k: preset.get(k, default) for k, default in defaults.items()}
    got = {k: info[k] for k in defaults}
    if got != want:
        raise CheckpointConversionError(f'checkpoint is not {family}-{arch}: it has {got}, '
                                        f'{family}-{arch} has {want}')
    return preset


def rename_backbone(state_dict: StateDict, rules: Sequence[Tuple[str, str]],
                    report: ConversionReport, family: str) -> StateDict:
    """Rename intermediate weights into the project's names; every key must be renamed.

    Args:
        state_dict: Intermediate backbone weights.
        rules: :func:`backbone_rules`' table.
        report: Records the mapping (as ``backbone.``-prefixed names).
        family: Named in the error (``'DINOv2'``).

    Returns:
        The renamed weights, without the ``backbone.`` prefix.
    """
    ours, unexpected = rename_keys(state_dict, rules, report, report_prefix='backbone.')
    if unexpected:
        raise CheckpointConversionError(f'unexpected backbone keys (not {family}): '
                                        f'{unexpected[:20]}'
                                        + (' ...' if len(unexpected) > 20 else ''))
    return ours
