"""What every weight converter shares: the error, the report, reading sources, renaming keys,
checking the result against a module, writing results.

A converter family (one module per backbone family, e.g. :mod:`eomt_mm.converters.dinov2`)
turns source weights into this project's state-dict names; :mod:`eomt_mm.converters.formats`
lists which source format uses which family. This module knows no model.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from eomt_mm.engine.checkpoint import UnsafeCheckpointError, load_checkpoint_weights_only
from eomt_mm.utils.io import atomic_write

__all__ = [
    'StateDict', 'FORMAT_VERSION', 'CheckpointConversionError', 'ConversionReport',
    'BackboneFamily', 'load_source_state_dict', 'save_converted', 'strip_prefix',
    'unwrap_transformers', 'rename_key', 'rename_keys', 'check_fits_module'
]

StateDict = Dict[str, torch.Tensor]

#: Version of the written ``{'state_dict', 'meta'}`` layout (``meta['format_version']``).
FORMAT_VERSION = 1


class CheckpointConversionError(ValueError):
    """A checkpoint does not fit the requested format / architecture."""


@dataclass
class ConversionReport:
    """What a conversion did, for printing and for tests.

    Args:
        mapped: ``(source key, written key)`` pairs.
        skipped: ``(source key, reason)`` pairs of source tensors deliberately not written.
        notes: Other changes (folded, fused, resampled tensors).
    """
    mapped: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def format(self) -> str:
        """The report as printed by ``tools/convert_weights.py``.

        Returns:
            One line per mapped / skipped tensor and per note.
        """
        lines = [f'mapped {len(self.mapped)} tensors:']
        lines += [f'  {src} -> {dst}' for src, dst in self.mapped]
        if self.skipped:
            lines.append(f'skipped {len(self.skipped)} tensors:')
            lines += [f'  {src}: {why}' for src, why in self.skipped]
        lines += [f'note: {n}' for n in self.notes]
        return '\n'.join(lines)


@dataclass(frozen=True)
class BackboneFamily:
    """How one backbone family's weights become this project's backbone weights.

    Args:
        name: The family (``'DINOv2'``), as printed in errors.
        inspect: ``inspect(weights, report, arch) -> info``: infer the architecture from the
            family's intermediate weight names, check it against the named ``arch`` preset
            (None: no check) and return a dict with at least ``embed_dims`` and
            ``patch_size``.
        convert: ``convert(weights, info, report, patch_size, img_size) -> (state_dict,
            meta)``: resample / rename into ``backbone.``-prefixed keys of the project's
            backbone, checked against that backbone; ``meta`` describes it (written as
            ``meta['backbone']``).
    """
    name: str
    inspect: Callable[[StateDict, ConversionReport, Optional[str]], dict]
    convert: Callable[..., Tuple[StateDict, dict]]


def _already_converted(path: str, obj: object) -> Optional[str]:
    """Why ``obj`` needs no conversion (a checkpoint this project wrote), or None.

    Args:
        path: The source file, for the message.
        obj: What it holds.

    Returns:
        The message of the refusal, or None when ``obj`` is not one of this project's files.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get('state_dict'), dict) \
            or not isinstance(obj.get('meta'), dict):
        return None
    meta, keys = obj['meta'], list(obj['state_dict'])
    has_backbone = any(k.startswith('backbone.') for k in keys)
    has_decoder = any(k.startswith('decoder.') for k in keys)
    if 'mmengine_version' in meta:
        what = 'a training checkpoint (written by mmengine, e.g. tools/train.py)'
    elif 'merged_from' in meta:
        what = 'a merged checkpoint (written by tools/merge_lora.py)'
    elif 'format_version' in meta and 'source_format' in meta:
        what = (f'already converted (by tools/convert_weights.py from '
                f'{meta["source_format"]!r})')
    else:
        return None
    if has_backbone and has_decoder:
        return (f'{path} is {what} of an EoMT model of this project: it needs no conversion. '
                f"Load it directly with load_from='{path}' (or pass it to tools/test.py / "
                'tools/merge_lora.py as CHECKPOINT).')
    if has_backbone and 'format_version' in meta:
        return (f'{path} is {what}: it needs no conversion. Load it directly with '
                f"backbone init_cfg=dict(type='Pretrained', checkpoint='{path}', "
                "prefix='backbone.').")
    return None


def load_source_state_dict(path: str) -> StateDict:
    """Read a checkpoint file without arbitrary unpickling.

    ``.safetensors`` files are read with safetensors; anything else with this project's
    one weights-only loader (:func:`eomt_mm.engine.checkpoint.load_checkpoint_weights_only`,
    ``torch.load(weights_only=True)`` with mmengine's own checkpoint types allow-listed). A
    top-level ``state_dict`` / ``model`` / ``teacher`` entry (Lightning, mmengine, DINOv2
    training checkpoints) is unwrapped.

    Args:
        path: The source file.

    Returns:
        Its state dict (every value a tensor).

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        CheckpointConversionError: If the file cannot be read weights-only, is not a
            checkpoint, holds no state dict of tensors, or is already one of this project's
            checkpoints (the message says how to load it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        try:
            obj = load_file(path, device='cpu')
        except SafetensorError as exc:
            raise CheckpointConversionError(
                f'{path} is not a safetensors file (corrupt or wrong file type; '
                f'{os.path.getsize(path)} bytes): {exc}') from None
    else:
        try:
            obj = load_checkpoint_weights_only(path, map_location='cpu')
        except UnsafeCheckpointError as exc:
            raise CheckpointConversionError(
                f'{exc} (read with torch.load(weights_only=True); nothing was converted)'
            ) from None
        except RuntimeError as exc:  # not a torch checkpoint: corrupt or another file type
            raise CheckpointConversionError(str(exc)) from None
    already = _already_converted(path, obj)
    if already is not None:
        raise CheckpointConversionError(already)
    for key in ('state_dict', 'model', 'teacher'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointConversionError(f'{path} does not contain a state dict')
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointConversionError(f'{path}: non-tensor entries {bad[:10]} in the state dict')
    return dict(obj)


def save_converted(path: str, state_dict: StateDict, meta: dict) -> None:
    """Write ``{'state_dict', 'meta'}`` atomically (see :func:`eomt_mm.utils.io.atomic_write`).

    Args:
        path: Output file; an existing one is replaced only by a complete new file.
        state_dict: The converted weights.
        meta: The conversion metadata (plain Python values, weights-only loadable).
    """
    payload = {'state_dict': {k: v.contiguous() for k, v in state_dict.items()}, 'meta': meta}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """The entries whose key starts with ``prefix``, with the prefix removed.

    Args:
        state_dict: Weights.
        prefix: Key prefix.

    Returns:
        The selected, renamed entries.
    """
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def unwrap_transformers(state_dict: StateDict, prefix: str, what: str) -> StateDict:
    """A transformers checkpoint's weights, without the model prefix every key may carry.

    Args:
        state_dict: Weights as saved by transformers.
        prefix: The outer prefix (``'model.'``, ``'dinov3_vit.'``), removed only when every key
            has it.
        what: The expected source, named in the error (``'Hugging Face EoMT'``).

    Returns:
        The weights, with ``embeddings.cls_token`` among them.

    Raises:
        CheckpointConversionError: If there is no ``embeddings.cls_token``.
    """
    if all(k.startswith(prefix) for k in state_dict):
        state_dict = strip_prefix(state_dict, prefix)
    if 'embeddings.cls_token' not in state_dict:
        raise CheckpointConversionError(f'not a {what} checkpoint: no embeddings.cls_token '
                                        f'(found {sorted(state_dict)[:8]}...)')
    return state_dict


def rename_key(key: str, rules: Sequence[Tuple[str, str]]) -> Optional[str]:
    """Rename ``key`` by the first full-match regex rule (``re.sub`` replacement syntax).

    Args:
        key: A source key.
        rules: ``(pattern, replacement)`` pairs, tried in order.

    Returns:
        The new name, or None when no rule matches.
    """
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(f'^{pattern}$', target, key)
    return None


def rename_keys(state_dict: StateDict, rules: Sequence[Tuple[str, str]],
                report: Optional[ConversionReport] = None,
                report_prefix: str = '') -> Tuple[StateDict, List[str]]:
    """Rename keys by the first full-match regex rule (``re.sub`` replacement syntax).

    Args:
        state_dict: Weights to rename.
        rules: ``(pattern, replacement)`` pairs, tried in order.
        report: Where to record ``(old, report_prefix + new)`` pairs; None records nothing.
        report_prefix: Prefix of the recorded new names (e.g. ``'backbone.'``).

    Returns:
        ``(renamed, unmatched keys)``.
    """
    out, unmatched = {}, []
    for key, value in state_dict.items():
        new = rename_key(key, rules)
        if new is None:
            unmatched.append(key)
            continue
        out[new] = value
        if report is not None:
            report.mapped.append((key, report_prefix + new))
    return out, unmatched


def check_fits_module(converted: StateDict, module: nn.Module, problem: str,
                      key_prefix: str = '', limit: Optional[int] = None) -> None:
    """Require the keys and shapes of ``module.state_dict()`` (built on the meta device).

    Args:
        converted: The converted weights.
        module: The module they must load into, strictly.
        problem: The start of the error (``'converted backbone does not fit DINOv2'``).
        key_prefix: Prefix of ``converted``'s keys before the module's own names
            (``'decoder.'``).
        limit: At most this many keys per kind of misfit in the error; None lists all.

    Raises:
        CheckpointConversionError: Listing the missing and unexpected keys and bad shapes.
    """
    expected = {key_prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(converted))[:limit]
    unexpected = sorted(set(converted) - set(expected))[:limit]
    shapes = [f'{k}: {tuple(converted[k].shape)} vs {expected[k]}'
              for k in sorted(set(converted) & set(expected))
              if tuple(converted[k].shape) != expected[k]][:limit]
    if missing or unexpected or shapes:
        raise CheckpointConversionError(
            problem + (f'; missing: {missing}' if missing else '')
            + (f'; unexpected: {unexpected}' if unexpected else '')
            + (f'; bad shapes: {shapes}' if shapes else ''))
