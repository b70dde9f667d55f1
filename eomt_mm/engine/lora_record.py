"""Which ``lora_config`` a checkpoint or adapter was trained with, and comparing it.

LoRA's scaling (``lora_alpha / rank``, or ``/ sqrt(rank)`` with ``use_rslora``) is not in
the weights: a checkpoint trained with ``lora_alpha=16`` and evaluated or merged with a
config saying 32 loads without any error and computes the wrong function. What a run was
trained with is recorded in two places this module reads:

* mmengine checkpoints: ``meta['cfg']``, the text of the training config that
  ``Runner.save_checkpoint`` writes. It is Python source, and mmengine's own reader executes
  it (``Config.fromstring``), which a checkpoint must never cause; so only the
  ``model.lora_config`` literal is read, with :mod:`ast` and a literal-only evaluator;
* adapter folders: ``adapter_config.json``'s ``lora_config``.

Only the settings that change what the adapted model computes are compared
(:data:`COMPUTE_KEYS`); dropout, initialisation and what is frozen do not change inference.
"""
from __future__ import annotations

import ast
from typing import Any, Dict, List, Mapping, Optional, Tuple

from eomt_mm.lora import LoRAConfig

__all__ = [
    'COMPUTE_KEYS', 'LoRAConfigMismatchError', 'lora_config_from_cfg_text',
    'recorded_checkpoint_lora_config', 'lora_config_mismatches', 'check_lora_config'
]

#: The lora_config keys that change the adapted model's outputs (which layers are adapted,
#: their ranks and scalings, which q/k/v slices).
COMPUTE_KEYS: Tuple[str, ...] = ('enabled', 'rank', 'lora_alpha', 'use_rslora',
                                 'target_modules', 'exclude_modules', 'layers',
                                 'rank_pattern', 'alpha_pattern', 'qkv_enable',
                                 'base_prefixes')


class LoRAConfigMismatchError(ValueError):
    """The config's LoRA settings differ from the ones the weights were trained with."""


class _NotLiteral(Exception):
    """A config node that is not a plain literal (never evaluated)."""


def _literal(node: ast.AST) -> Any:
    """Evaluate a literal config node: constants, lists, tuples, dicts and ``dict(k=v)``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        values = [_literal(v) for v in node.elts]
        return values if isinstance(node, ast.List) else tuple(values)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _NotLiteral('dict unpacking')
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == 'dict' and not node.args
            and all(kw.arg is not None for kw in node.keywords)):
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise _NotLiteral(type(node).__name__)


def _entry(node: ast.AST, key: str) -> Optional[ast.AST]:
    """The node of ``key`` in a ``dict(...)`` call or ``{...}`` literal node, or None."""
    if isinstance(node, ast.Call):
        for kw in node.keywords:
            if kw.arg == key:
                return kw.value
    elif isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and k.value == key:
                return v
    return None


def lora_config_from_cfg_text(text: str) -> Tuple[bool, Optional[dict]]:
    """Read ``model.lora_config`` from a config's text without executing it.

    Args:
        text (str): A config as Python source (mmengine's ``pretty_text``).

    Returns:
        tuple: ``(readable, lora_config)``: ``readable`` is False when the text or its
        ``model.lora_config`` is not plain literals; ``lora_config`` is None when the model
        has none (or it is None).
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return False, None
    model = None
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id == 'model'):
            model = stmt.value
    if model is None:
        return False, None
    node = _entry(model, 'lora_config')
    if node is None:
        return True, None
    try:
        value = _literal(node)
    except _NotLiteral:
        return False, None
    return (True, value) if value is None or isinstance(value, dict) else (False, None)


def recorded_checkpoint_lora_config(checkpoint: Any) -> Tuple[bool, Optional[dict]]:
    """The ``model.lora_config`` an mmengine checkpoint was trained with.

    Args:
        checkpoint (Any): A loaded checkpoint.

    Returns:
        tuple: ``(recorded, lora_config)``: ``recorded`` is False when the checkpoint
        holds no readable training config (a plain state dict, a merged checkpoint, a
        converted file).
    """
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    text = meta.get('cfg') if isinstance(meta, Mapping) else None
    if not isinstance(text, str):
        return False, None
    return lora_config_from_cfg_text(text)


def _normalised(cfg: Optional[Mapping]) -> Dict[str, Any]:
    """The compared settings with their defaults filled in (None: LoRA off)."""
    if cfg is None:
        return dict(LoRAConfig(enabled=False).to_dict())
    known = {k: v for k, v in dict(cfg).items() if k in LoRAConfig.valid_keys()}
    return LoRAConfig.from_dict(known).to_dict()


def lora_config_mismatches(recorded: Optional[Mapping],
                           current: Optional[Mapping]) -> List[Tuple[str, Any, Any]]:
    """The compute-relevant settings that differ, as ``(key, recorded, current)``.

    Args:
        recorded (Mapping | None): What the weights were trained with (None: no LoRA).
        current (Mapping | None): What the model is built with now (None: no LoRA).

    Returns:
        list[tuple]: One entry per differing key of :data:`COMPUTE_KEYS`; empty when both
        have LoRA off.
    """
    old, new = _normalised(recorded), _normalised(current)
    if not old['enabled'] and not new['enabled']:
        return []
    if old['enabled'] != new['enabled']:
        return [('enabled', old['enabled'], new['enabled'])]
    return [(k, old[k], new[k]) for k in COMPUTE_KEYS if old[k] != new[k]]


def _option(value: Any) -> str:
    """``value`` as mmengine's ``--cfg-options`` parser reads it."""
    if isinstance(value, str):
        return value
    return repr(value).replace(' ', '').replace("'", '')


def check_lora_config(recorded: Optional[Mapping], current: Optional[Mapping],
                      source: str, override: str) -> None:
    """Raise unless the weights were trained with the LoRA settings of the config.

    Args:
        recorded (Mapping | None): What ``source`` was trained with.
        current (Mapping | None): What the model is built with now.
        source (str): The checkpoint or adapter, for the message.
        override (str): The flag that uses the config's values anyway, for the message.

    Raises:
        LoRAConfigMismatchError: Naming every differing key with both values, the
            ``--cfg-options`` that rebuild the model as it was trained, and ``override``.
    """
    diffs = lora_config_mismatches(recorded, current)
    if not diffs:
        return
    lines = '\n  '.join(f'lora_config.{k}: trained with {old!r}, the config says {new!r}'
                        for k, old, new in diffs)
    fix = ' '.join(f'model.lora_config.{k}={_option(old)}' for k, old, _ in diffs)
    raise LoRAConfigMismatchError(
        f'{source} was trained with other LoRA settings than the config (these change what '
        f'the model computes):\n  {lines}\nBuild the model as it was trained with '
        f'--cfg-options {fix}, or pass {override} to use the config\'s values anyway.')
