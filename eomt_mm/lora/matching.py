"""Which module names a ``lora_config`` rule selects: the three matching dialects.

``name`` is a qualified name in the model (``backbone.layers.3.attn.qkv``). Each config key
speaks one of three dialects; nothing is ever matched by loose substring.

+-----------------------+-------------------------------------------------------------------+
| Config keys           | A pattern matches the qualified name ``name`` when                |
+=======================+===================================================================+
| ``target_modules``,   | *LoRA-target dialect* (:func:`match_name`), first rule that       |
| ``exclude_modules``,  | applies:                                                          |
| keys of               |                                                                   |
| ``rank_pattern`` and  | 1. a default LoRA target (``qkv``, ``proj``, ``fc1``, ``fc2``;    |
| ``alpha_pattern``     |    table below): ``name`` ends with one of its expansions on a    |
|                       |    component boundary;                                            |
|                       | 2. a pattern holding a regex metacharacter (``^ $ * + ? ( ) [ ]   |
|                       |    { } | \\``; a ``.`` alone does not count):                     |
|                       |    ``re.fullmatch(pattern, name)``;                               |
|                       | 3. anything else is a dotted suffix on component boundaries:      |
|                       |    ``attn.proj`` matches ``attn.proj`` and ``*.attn.proj``, never |
|                       |    ``*.xattn.proj``.                                              |
+-----------------------+-------------------------------------------------------------------+
| ``trainable_modules`` | *Exact-or-regex dialect* (:func:`match_trainable`):               |
|                       | ``name == pattern`` or ``re.fullmatch(pattern, name)``. A module  |
|                       | match keeps all of its parameters; a bare child name (``norm``)   |
|                       | matches nothing.                                                  |
+-----------------------+-------------------------------------------------------------------+
| ``base_prefixes``     | *Prefix dialect* (:func:`under_prefixes`): ``name == prefix`` or  |
|                       | ``name`` starts with ``prefix + '.'``; ``''`` is the whole model. |
|                       | Each prefix must name a submodule (:func:`check_prefixes`).       |
+-----------------------+-------------------------------------------------------------------+

``layers`` narrows ``target_modules`` further by block index: the leftmost ``layers.<i>.`` or
``blocks.<i>.`` in the name (:func:`block_index`); see :func:`resolve_layers`.

The default LoRA targets are aliases for the transformer-block layers of both OpenMMLab and
timm ViTs, not bare child names (a bare ``proj`` would also hit timm's ``patch_embed.proj``
convolution):

============  =====================================================================
``qkv``       ``attn.qkv``
``proj``      ``attn.proj``
``fc1``       ``mlp.fc1`` (timm), ``ffn.layers.0.0`` (mmpretrain), ``ffn.w12`` (SwiGLU, ViT-g)
``fc2``       ``mlp.fc2`` (timm), ``ffn.layers.1`` (mmpretrain), ``ffn.w3`` (SwiGLU, ViT-g)
============  =====================================================================
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from torch import nn

__all__ = [
    'DEFAULT_TARGET_ALIASES', 'DEFAULT_TARGETS', 'LayersSpec', 'is_regex', 'match_name',
    'check_pattern', 'first_matching_pattern', 'match_trainable', 'check_trainable_pattern',
    'under_prefixes', 'check_prefixes', 'block_index', 'resolve_layers', 'abbreviate_names'
]

DEFAULT_TARGET_ALIASES: Dict[str, Tuple[str, ...]] = {
    'qkv': ('attn.qkv', ),
    'proj': ('attn.proj', ),
    # ffn.w12 / ffn.w3: mmpretrain's SwiGLUFFNFused (DINOv2-g): the fused gate+value input
    # projection plays fc1's role, the output projection fc2's.
    'fc1': ('mlp.fc1', 'ffn.layers.0.0', 'ffn.w12'),
    'fc2': ('mlp.fc2', 'ffn.layers.1', 'ffn.w3'),
}
DEFAULT_TARGETS: Tuple[str, ...] = tuple(DEFAULT_TARGET_ALIASES)

_REGEX_CHARS = set('^$*+?()[]{}|\\')
# Leftmost `layers.<i>.` / `blocks.<i>.`: the transformer block holding the module
# (mmpretrain's inner `ffn.layers.0.0` comes later in the name, so leftmost is right).
_BLOCK_RE = re.compile(r'(?:^|\.)(layers|blocks)\.(\d+)\.')

LayersSpec = Union[None, int, Sequence[int], Mapping[str, int]]


# ----------------------------------------------------------------------- LoRA targets
def is_regex(pattern: str) -> bool:
    """Whether a target pattern is a regular expression (holds a metacharacter)."""
    return any(c in _REGEX_CHARS for c in pattern)


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith('.' + suffix)


def match_name(name: str, pattern: str) -> bool:
    """Whether ``name`` matches a LoRA-target ``pattern`` (table in the module doc).

    Args:
        name (str): Qualified module name.
        pattern (str): A default LoRA target alias, a dotted suffix or a full-match regex.

    Returns:
        bool: True on a match.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f'module pattern must be a non-empty string, got {pattern!r}')
    if pattern in DEFAULT_TARGET_ALIASES:
        return any(_suffix_match(name, s) for s in DEFAULT_TARGET_ALIASES[pattern])
    if is_regex(pattern):
        return re.fullmatch(pattern, name) is not None
    return _suffix_match(name, pattern)


def check_pattern(pattern: object, what: str) -> None:
    """Raise a ValueError naming ``what`` unless ``pattern`` is a usable LoRA-target pattern.

    Args:
        pattern (object): The value to check.
        what (str): Where it came from, for the message (``'lora_config.target_modules'``).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f'{what}: patterns must be non-empty strings, got {pattern!r}')
    if is_regex(pattern) and pattern not in DEFAULT_TARGET_ALIASES:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f'{what}: {pattern!r} is not a valid regular expression '
                             f'({err})') from None


def first_matching_pattern(name: str, patterns: Mapping[str, object]) -> Optional[str]:
    """The first key of ``patterns`` (dict order) matching ``name``, or None.

    Args:
        name (str): Qualified module name.
        patterns (Mapping[str, object]): ``rank_pattern`` / ``alpha_pattern``.

    Returns:
        str | None: The winning pattern.
    """
    for pattern in patterns:
        if match_name(name, pattern):
            return pattern
    return None


# ------------------------------------------------------------------ trainable_modules
def match_trainable(name: str, pattern: str) -> bool:
    """Whether ``name`` matches a ``trainable_modules`` entry (exact name or full regex).

    Args:
        name (str): Qualified module or parameter name.
        pattern (str): Exact qualified name or full-match regular expression.

    Returns:
        bool: True on a match.
    """
    # A plain dotted name is compared literally first ('.' in a regex matches any char).
    return name == pattern or re.fullmatch(pattern, name) is not None


def check_trainable_pattern(pattern: object, what: str = 'trainable_modules') -> None:
    """Raise a ValueError unless ``pattern`` is a usable ``trainable_modules`` entry.

    Args:
        pattern (object): The value to check.
        what (str): Where it came from, for the message. Defaults to
            ``'trainable_modules'``.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f'{what} entries must be non-empty strings, got {pattern!r}')
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f'{what} entry {pattern!r} is neither an exact name nor a valid '
                         f'regular expression ({err})') from None


# --------------------------------------------------------------------- base_prefixes
def under_prefixes(name: str, prefixes: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or lies inside one (``''`` = everything).

    Args:
        name (str): Qualified module, parameter or state-dict name.
        prefixes (Sequence[str]): Submodule qualified names.

    Returns:
        bool: True when inside.
    """
    return any(p == '' or name == p or name.startswith(p + '.') for p in prefixes)


def check_prefixes(model: nn.Module, prefixes: Sequence[str]) -> None:
    """Raise a ValueError unless every non-empty prefix names a submodule of ``model``.

    Args:
        model (nn.Module): The model the prefixes refer to.
        prefixes (Sequence[str]): Submodule qualified names (``''`` = whole model).
    """
    for prefix in prefixes:
        if not prefix:
            continue
        try:
            model.get_submodule(prefix)
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise ValueError(
                f'base prefix {prefix!r} is not a submodule of {type(model).__name__} '
                f'(top-level children: {children}); set base_prefixes to the '
                "pretrained part, [''] meaning the whole model") from None


# ---------------------------------------------------------------------------- layers
def block_index(name: str) -> Optional[Tuple[str, int]]:
    """``(container name, block index)`` of the block holding ``name``, or None.

    ``backbone.layers.3.attn.qkv`` -> ``('backbone.layers', 3)``.

    Args:
        name (str): Qualified module name.

    Returns:
        tuple[str, int] | None: The block container and index.
    """
    m = _BLOCK_RE.search(name)
    if m is None:
        return None
    # m.start(2) - 1 is the dot before the index: `backbone.layers`.
    return name[:m.start(2) - 1], int(m.group(2))


def resolve_layers(layers: LayersSpec, num_blocks: int, container: str) -> Set[int]:
    """Absolute block indices selected by ``layers`` in a container of ``num_blocks``.

    Args:
        layers (int | Sequence[int] | dict): Indices (negative = from the end) or
            ``{'last': N}``.
        num_blocks (int): Length of the block container.
        container (str): Its qualified name, for messages.

    Returns:
        set[int]: Selected indices in ``[0, num_blocks)``.
    """
    if isinstance(layers, Mapping):
        if set(layers) != {'last'}:
            raise ValueError(f"layers as a dict must be {{'last': N}}, got {dict(layers)!r}")
        last = layers['last']
        if isinstance(last, bool) or not isinstance(last, int) or not 0 < last <= num_blocks:
            raise ValueError(f"layers={{'last': {last!r}}}: N must be an int in "
                             f'[1, {num_blocks}] ({container!r} has {num_blocks} blocks)')
        return set(range(num_blocks - last, num_blocks))
    items = [layers] if isinstance(layers, int) else list(layers)
    out = set()
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f'layers entries must be ints, got {i!r}')
        if not -num_blocks <= i < num_blocks:
            raise ValueError(f'layer index {i} out of range: {container!r} has {num_blocks} '
                             f'blocks (valid: {-num_blocks}..{num_blocks - 1})')
        out.add(i % num_blocks)
    return out


def abbreviate_names(names: Sequence[str], limit: int = 25) -> str:
    """Collapse block indices (``layers.*.attn.qkv (x12)``) so an error listing stays short.

    Args:
        names (Sequence[str]): Qualified names.
        limit (int): Most groups shown before ``... and N more``. Defaults to 25.

    Returns:
        str: Comma-separated groups, ``'(none)'`` when empty.
    """
    groups: 'OrderedDict[str, int]' = OrderedDict()
    for name in names:
        key = _BLOCK_RE.sub(lambda m: f'{m.group(0)[:-len(m.group(2)) - 1]}*.', name, count=1)
        groups[key] = groups.get(key, 0) + 1
    lines: List[str] = [f'{k} (x{c})' if c > 1 else k for k, c in groups.items()]
    more = len(lines) - limit
    text = ', '.join(lines[:limit])
    return text + (f', ... and {more} more' if more > 0 else '') if lines else '(none)'
