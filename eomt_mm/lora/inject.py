"""Recursive, name-driven replacement of ``nn.Linear`` layers by :class:`LoRALinear`.

Target matching rules (the same matcher serves ``target_modules``, ``exclude_modules``,
``rank_pattern`` and ``alpha_pattern``); ``name`` is a module's qualified name in the
model (``backbone.layers.3.attn.qkv``):

1. **Short names of the seed** are aliases for the transformer-block layers of both
   OpenMMLab and timm ViTs, not bare child names (a bare ``proj`` would also hit timm's
   ``patch_embed.proj`` convolution):

   ============  ===============================================================
   ``qkv``       ``attn.qkv``
   ``proj``      ``attn.proj``
   ``fc1``       ``mlp.fc1`` (timm), ``ffn.layers.0.0`` (mmpretrain), ``ffn.w12`` (SwiGLU, ViT-g)
   ``fc2``       ``mlp.fc2`` (timm), ``ffn.layers.1`` (mmpretrain), ``ffn.w3`` (SwiGLU, ViT-g)
   ============  ===============================================================

2. A target containing any regex metacharacter (``^ $ * + ? ( ) [ ] { } | \\``) is a
   regular expression that must match the **whole** qualified name (``re.fullmatch``).
   A ``.`` alone does not make a regex.
3. Anything else is a dotted suffix on component boundaries: ``attn.proj`` matches
   ``attn.proj`` and ``*.attn.proj`` but never ``*.xattn.proj``.

Nothing is ever matched by loose substring.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from .layer import LoRALinear, _check_lora_args

__all__ = ['inject_lora', 'match_name', 'SHORT_NAME_ALIASES', 'block_index']

SHORT_NAME_ALIASES: Dict[str, Tuple[str, ...]] = {
    'qkv': ('attn.qkv', ),
    'proj': ('attn.proj', ),
    # ffn.w12 / ffn.w3: mmpretrain's SwiGLUFFNFused (DINOv2-g): the fused gate+value input
    # projection plays fc1's role, the output projection fc2's.
    'fc1': ('mlp.fc1', 'ffn.layers.0.0', 'ffn.w12'),
    'fc2': ('mlp.fc2', 'ffn.layers.1', 'ffn.w3'),
}

_REGEX_CHARS = set('^$*+?()[]{}|\\')
# Leftmost `layers.<i>.` / `blocks.<i>.`: the transformer block holding the module
# (mmpretrain's inner `ffn.layers.0.0` comes later in the name, so leftmost is right).
_BLOCK_RE = re.compile(r'(?:^|\.)(layers|blocks)\.(\d+)\.')

LayersSpec = Union[None, int, Sequence[int], Mapping[str, int]]


def _is_regex(pattern: str) -> bool:
    return any(c in _REGEX_CHARS for c in pattern)


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith('.' + suffix)


def match_name(name: str, pattern: str) -> bool:
    """Whether the qualified module name ``name`` matches ``pattern`` (rules above)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f'module pattern must be a non-empty string, got {pattern!r}')
    if pattern in SHORT_NAME_ALIASES:
        return any(_suffix_match(name, s) for s in SHORT_NAME_ALIASES[pattern])
    if _is_regex(pattern):
        return re.fullmatch(pattern, name) is not None
    return _suffix_match(name, pattern)


def _check_pattern(pattern, what: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f'{what}: patterns must be non-empty strings, got {pattern!r}')
    if _is_regex(pattern) and pattern not in SHORT_NAME_ALIASES:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f'{what}: {pattern!r} is not a valid regular expression '
                             f'({err})') from None


def block_index(name: str) -> Optional[Tuple[str, int]]:
    """``(container name, block index)`` of the block holding ``name``, or None.

    ``backbone.layers.3.attn.qkv`` -> ``('backbone.layers', 3)``.
    """
    m = _BLOCK_RE.search(name)
    if m is None:
        return None
    # m.start(2) - 1 is the dot before the index: `backbone.layers`.
    return name[:m.start(2) - 1], int(m.group(2))


def _resolve_layers(layers: LayersSpec, n_blocks: int, container: str) -> set:
    """Absolute block indices selected by ``layers`` in a container of ``n_blocks``."""
    if isinstance(layers, Mapping):
        if set(layers) != {'last'}:
            raise ValueError(f"layers as a dict must be {{'last': N}}, got {dict(layers)!r}")
        n = layers['last']
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= n_blocks:
            raise ValueError(f"layers={{'last': {n!r}}}: N must be an int in [1, {n_blocks}] "
                             f"({container!r} has {n_blocks} blocks)")
        return set(range(n_blocks - n, n_blocks))
    items = [layers] if isinstance(layers, int) else list(layers)
    out = set()
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f'layers entries must be ints, got {i!r}')
        if not -n_blocks <= i < n_blocks:
            raise ValueError(f'layer index {i} out of range: {container!r} has {n_blocks} '
                             f'blocks (valid: {-n_blocks}..{n_blocks - 1})')
        out.add(i % n_blocks)
    return out


def _abbreviate(names: Sequence[str], limit: int = 25) -> str:
    """Collapse block indices (``layers.*.attn.qkv (x12)``) so the listing stays short."""
    groups: 'OrderedDict[str, int]' = OrderedDict()
    for n in names:
        key = _BLOCK_RE.sub(lambda m: f'{m.group(0)[:-len(m.group(2)) - 1]}*.', n, count=1)
        groups[key] = groups.get(key, 0) + 1
    lines = [f'{k} (x{c})' if c > 1 else k for k, c in groups.items()]
    more = len(lines) - limit
    text = ', '.join(lines[:limit])
    return text + (f', ... and {more} more' if more > 0 else '') if lines else '(none)'


def _first_match(name: str, patterns: Mapping[str, float]) -> Optional[str]:
    for pat in patterns:
        if match_name(name, pat):
            return pat
    return None


def inject_lora(model: nn.Module,
                target_modules: Sequence[str],
                rank: int = 8,
                alpha: float = 16.0,
                dropout: float = 0.0,
                use_rslora: bool = False,
                init_lora_a: str = 'kaiming_uniform',
                layers: LayersSpec = None,
                exclude_modules: Optional[Sequence[str]] = None,
                rank_pattern: Optional[Mapping[str, int]] = None,
                alpha_pattern: Optional[Mapping[str, float]] = None,
                qkv_enable: Optional[Sequence[bool]] = None,
                prefixes: Optional[Sequence[str]] = None) -> List[str]:
    """Replace every matching ``nn.Linear`` of ``model`` by a :class:`LoRALinear`, in place.

    Each new layer holds a copy of the original weights on the same device and dtype,
    so the model's outputs are unchanged right after injection.

    Args:
        model (nn.Module): Model to adapt (modified in place).
        target_modules (Sequence[str]): Patterns selecting the layers (see module doc:
            seed short names, dotted suffixes, full-match regexes). Every pattern must
            match at least one layer.
        rank (int): Adapter rank (> 0). Defaults to 8.
        alpha (float): Adapter alpha (> 0). Defaults to 16.0.
        dropout (float): Adapter-input dropout in ``[0, 1)``. Defaults to 0.0.
        use_rslora (bool): ``alpha / sqrt(r)`` scaling. Defaults to False.
        init_lora_a (str): ``'kaiming_uniform'`` or ``'gaussian'``.
        layers (int | Sequence[int] | dict | None): Restrict to transformer blocks, by
            index parsed from ``layers.<i>.`` / ``blocks.<i>.`` in the name. Negative ints
            count from the end; ``{'last': N}`` selects the last N blocks of each block
            container. Modules outside any block are then not adapted. None = all.
        exclude_modules (Sequence[str] | None): Patterns of layers never adapted.
        rank_pattern (dict[str, int] | None): Per-pattern rank overrides; the first
            matching pattern (dict order) wins. Each pattern must match an adapted layer.
        alpha_pattern (dict[str, float] | None): Per-pattern alpha overrides, same rules.
        qkv_enable (Sequence[bool] | None): ``enable_slices`` for adapted layers whose
            last name component is ``qkv`` (fused projections), e.g. ``[True, False,
            True]`` for q and v only. At least one such layer must be adapted.
        prefixes (Sequence[str] | None): Only search inside these submodules (qualified
            names; ``''`` is the whole model). None = whole model.

    Returns:
        list[str]: Qualified names of the adapted layers, in model order.

    Raises:
        ValueError: Bad rank/alpha/dropout, a pattern that matches nothing (the message
            lists the Linear layers that exist), bad ``layers`` or ``qkv_enable``.
        TypeError: A matched module is not an ``nn.Linear``, is already a
            :class:`LoRALinear` (adapters are never nested), or is a Linear whose owner
            bypasses its forward (``nn.MultiheadAttention.out_proj``).
    """
    _check_lora_args(rank, alpha, dropout, init_lora_a)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not target_modules:
        raise ValueError('target_modules is empty: name at least one layer pattern '
                         "(e.g. ['qkv', 'proj', 'fc1', 'fc2'])")
    exclude_modules = list(exclude_modules or [])
    rank_pattern = dict(rank_pattern or {})
    alpha_pattern = dict(alpha_pattern or {})
    for what, pats in (('target_modules', target_modules),
                       ('exclude_modules', exclude_modules),
                       ('rank_pattern', rank_pattern), ('alpha_pattern', alpha_pattern)):
        for p in pats:
            _check_pattern(p, what)
    for pat, r in rank_pattern.items():
        _check_lora_args(r, alpha, dropout, init_lora_a)
    for pat, a in alpha_pattern.items():
        _check_lora_args(rank, a, dropout, init_lora_a)

    # Candidate modules: inside the prefixes.
    if prefixes is None:
        prefixes = ['']
    for p in prefixes:
        if not isinstance(p, str):
            raise ValueError(f'prefixes entries must be strings, got {p!r}')
        if p:
            try:
                model.get_submodule(p)
            except AttributeError:
                children = [n for n, _ in model.named_children()]
                raise ValueError(f'prefix {p!r} is not a submodule of '
                                 f'{type(model).__name__} (top-level children: {children})'
                                 ) from None
    modules = [(n, m) for n, m in model.named_modules()
               if n and any(p == '' or n == p or n.startswith(p + '.') for p in prefixes)]
    parents = dict(model.named_modules())
    linear_names = [n for n, m in modules if isinstance(m, nn.Linear)]

    selected_blocks: Dict[str, set] = {}

    def in_layers(name: str) -> bool:
        if layers is None:
            return True
        blk = block_index(name)
        if blk is None:
            return False
        container, idx = blk
        if container not in selected_blocks:
            holder = model.get_submodule(container)
            if not hasattr(holder, '__len__'):
                raise ValueError(f'layers={layers!r}: {container!r} is a '
                                 f'{type(holder).__name__}, not a list of blocks')
            n_blocks = len(holder)
            selected_blocks[container] = _resolve_layers(layers, n_blocks, container)
        return idx in selected_blocks[container]

    chosen: List[Tuple[str, nn.Module]] = []
    hits = {t: 0 for t in target_modules}
    for name, module in modules:
        matched = [t for t in target_modules if match_name(name, t)]
        if not matched:
            continue
        if any(match_name(name, e) for e in exclude_modules) or not in_layers(name):
            # Counted as a hit so that excluding/restricting is not reported as a typo.
            for t in matched:
                hits[t] += 1
            continue
        for t in matched:
            hits[t] += 1
        if isinstance(module, LoRALinear):
            raise TypeError(f'{name!r} (matched by {matched}) is already a LoRALinear: '
                            'LoRA was injected twice. Adapters are never nested; build '
                            'the model once or remove the duplicate lora_config.')
        if not isinstance(module, nn.Linear):
            raise TypeError(f'{name!r} (matched by {matched}) is a '
                            f'{type(module).__name__}, not an nn.Linear; LoRA adapts Linear '
                            'layers only. Narrow the pattern (e.g. a dotted suffix).')
        parent_name, _, child = name.rpartition('.')
        parent = parents[parent_name]
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(f'{name!r} belongs to nn.MultiheadAttention, which reads its '
                            'weights directly instead of calling the layer, so an adapter '
                            'there would be silently ignored.')
        chosen.append((name, module))

    missing = [t for t, c in hits.items() if c == 0]
    if missing:
        where = '' if prefixes == [''] else f' under {list(prefixes)}'
        raise ValueError(f'target_modules {missing} matched no module{where}. Linear '
                         f'layers that exist: {_abbreviate(linear_names)}')
    if not chosen:
        raise ValueError(f'target_modules {list(target_modules)} matched only excluded '
                         f'modules or modules outside layers={layers!r}; nothing to adapt.')

    for what, pats in (('rank_pattern', rank_pattern), ('alpha_pattern', alpha_pattern)):
        for pat in pats:
            if not any(match_name(n, pat) for n, _ in chosen):
                raise ValueError(f'{what} key {pat!r} matches no adapted layer; adapted: '
                                 f'{_abbreviate([n for n, _ in chosen])}')

    if qkv_enable is not None:
        qkv_names = [n for n, _ in chosen if n.rpartition('.')[2] == 'qkv']
        if not qkv_names:
            raise ValueError('qkv_enable is set but no adapted layer is a fused qkv '
                             f"projection (name ending in 'qkv'); adapted: "
                             f'{_abbreviate([n for n, _ in chosen])}')

    done = []
    for name, module in chosen:
        pr = _first_match(name, rank_pattern)
        pa = _first_match(name, alpha_pattern)
        slices = None
        if qkv_enable is not None and name.rpartition('.')[2] == 'qkv':
            slices = list(qkv_enable)
        try:
            new = LoRALinear.from_linear(
                module,
                rank=rank_pattern[pr] if pr is not None else rank,
                alpha=alpha_pattern[pa] if pa is not None else alpha,
                dropout=dropout,
                use_rslora=use_rslora,
                init_lora_a=init_lora_a,
                enable_slices=slices)
        except ValueError as err:
            raise ValueError(f'cannot adapt {name!r}: {err}') from None
        parent_name, _, child = name.rpartition('.')
        setattr(parents[parent_name], child, new)
        done.append(name)
    return done
