"""Replacement of the ``nn.Linear`` layers a ``lora_config`` selects by :class:`LoRALinear`.

Which names a pattern selects is decided in :mod:`eomt_mm.lora.matching` (one table of the
matching rules); this module runs the steps of an injection in order:

1. validation: :func:`inject_lora` builds a :class:`~eomt_mm.lora.config.LoRAConfig` from
   its keywords (``apply_lora`` passes the one it validated, to :func:`inject_from_config`);
2. candidate search: the modules inside ``base_prefixes`` (:func:`_candidates`) and the
   blocks ``layers`` keeps (:class:`_BlockSelection`);
3. hit counting and error reporting: every target must match a module, every override an
   adapted layer, and only plain ``nn.Linear`` layers are adapted (:func:`_select`,
   :func:`_check_hits`, :func:`_check_overrides`);
4. replacement (:func:`_replace`), only once every check has passed, so a bad config leaves
   the model untouched.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from torch import nn

from .config import LoRAConfig
from .layer import LoRALinear
from .matching import (LayersSpec, abbreviate_names, block_index, check_prefixes,
                       first_matching_pattern, match_name, resolve_layers, under_prefixes)

__all__ = ['inject_lora', 'inject_from_config']

Candidates = List[Tuple[str, nn.Module]]


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
    so the model's outputs are unchanged right after injection. The arguments are
    validated once, as the :class:`LoRAConfig` they map to, so error messages name the
    config key (``alpha`` is ``lora_alpha``, ``dropout`` is ``lora_dropout``,
    ``prefixes`` is ``base_prefixes``).

    Args:
        model (nn.Module): Model to adapt (modified in place).
        target_modules (Sequence[str]): Patterns selecting the layers (the default LoRA
            targets, dotted suffixes, full-match regexes; see
            :mod:`eomt_mm.lora.matching`). Every pattern must match at least one layer.
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
    # None means "the default" for these keywords; LoRAConfig checks and normalises
    # every value (a lone string becomes a one-item list, tuples become lists).
    cfg = LoRAConfig(
        target_modules=target_modules,
        rank=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        init_lora_a=init_lora_a,
        layers=layers,
        exclude_modules=[] if exclude_modules is None else exclude_modules,
        rank_pattern={} if rank_pattern is None else rank_pattern,
        alpha_pattern={} if alpha_pattern is None else alpha_pattern,
        qkv_enable=qkv_enable,
        base_prefixes=[''] if prefixes is None else prefixes)
    return inject_from_config(model, cfg)


def inject_from_config(model: nn.Module, cfg: LoRAConfig) -> List[str]:
    """:func:`inject_lora` with an already validated config (``apply_lora``'s path).

    Args:
        model (nn.Module): Model to adapt (modified in place).
        cfg (LoRAConfig): The validated config; its ``target_modules``, ``rank``,
            ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_a``, ``layers``,
            ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``qkv_enable`` and
            ``base_prefixes`` are used.

    Returns:
        list[str]: Qualified names of the adapted layers, in model order.
    """
    candidates = _candidates(model, cfg.base_prefixes)
    chosen, hits = _select(model, candidates, cfg)
    linear_names = [n for n, m in candidates if isinstance(m, nn.Linear)]
    _check_hits(hits, chosen, linear_names, cfg)
    _check_overrides(chosen, cfg)
    return _replace(model, chosen, cfg)


# ------------------------------------------------------------------ candidate search
def _candidates(model: nn.Module, prefixes: Sequence[str]) -> Candidates:
    """Named modules inside ``prefixes`` (the model itself excluded), in model order."""
    check_prefixes(model, prefixes)
    return [(n, m) for n, m in model.named_modules() if n and under_prefixes(n, prefixes)]


class _BlockSelection:
    """Whether a module lies in a block that ``layers`` keeps (containers resolved lazily).

    Args:
        model (nn.Module): The model, to look the block containers up.
        layers (LayersSpec): The ``layers`` setting; None keeps everything.
    """

    def __init__(self, model: nn.Module, layers: LayersSpec) -> None:
        self.model = model
        self.layers = layers
        self.selected: Dict[str, Set[int]] = {}

    def __call__(self, name: str) -> bool:
        if self.layers is None:
            return True
        block = block_index(name)
        if block is None:
            return False
        container, index = block
        if container not in self.selected:
            holder = self.model.get_submodule(container)
            if not hasattr(holder, '__len__'):
                raise ValueError(f'layers={self.layers!r}: {container!r} is a '
                                 f'{type(holder).__name__}, not a list of blocks')
            self.selected[container] = resolve_layers(self.layers, len(holder), container)
        return index in self.selected[container]


# ------------------------------------------------------ hit counting, error reporting
def _select(model: nn.Module, candidates: Candidates,
            cfg: LoRAConfig) -> Tuple[Candidates, Dict[str, int]]:
    """The modules to adapt, and how many modules each target pattern matched.

    A module that a target matches but ``exclude_modules`` or ``layers`` removes still
    counts as a hit, so that excluding or restricting is not reported as a typo.
    """
    in_layers = _BlockSelection(model, cfg.layers)
    parents = dict(model.named_modules())
    chosen: Candidates = []
    hits = {t: 0 for t in cfg.target_modules}
    for name, module in candidates:
        matched = [t for t in cfg.target_modules if match_name(name, t)]
        if not matched:
            continue
        for target in matched:
            hits[target] += 1
        if any(match_name(name, e) for e in cfg.exclude_modules) or not in_layers(name):
            continue
        if isinstance(module, LoRALinear):
            raise TypeError(f'{name!r} (matched by {matched}) is already a LoRALinear: '
                            'LoRA was injected twice. Adapters are never nested; build '
                            'the model once or remove the duplicate lora_config.')
        if not isinstance(module, nn.Linear):
            raise TypeError(f'{name!r} (matched by {matched}) is a '
                            f'{type(module).__name__}, not an nn.Linear; LoRA adapts Linear '
                            'layers only. Narrow the pattern (e.g. a dotted suffix).')
        if isinstance(parents[name.rpartition('.')[0]], nn.MultiheadAttention):
            raise TypeError(f'{name!r} belongs to nn.MultiheadAttention, which reads its '
                            'weights directly instead of calling the layer, so an adapter '
                            'there would be silently ignored.')
        chosen.append((name, module))
    return chosen, hits


def _check_hits(hits: Mapping[str, int], chosen: Candidates, linear_names: Sequence[str],
                cfg: LoRAConfig) -> None:
    """Every target matched something, and something is left to adapt."""
    missing = [t for t, count in hits.items() if count == 0]
    if missing:
        prefixes = cfg.base_prefixes
        where = '' if prefixes == [''] else f' under {list(prefixes)}'
        raise ValueError(f'target_modules {missing} matched no module{where}. Linear '
                         f'layers that exist: {abbreviate_names(linear_names)}')
    if not chosen:
        raise ValueError(f'target_modules {list(cfg.target_modules)} matched only excluded '
                         f'modules or modules outside layers={cfg.layers!r}; nothing to '
                         'adapt.')


def _check_overrides(chosen: Candidates, cfg: LoRAConfig) -> None:
    """Every rank/alpha override and ``qkv_enable`` applies to an adapted layer."""
    adapted = [n for n, _ in chosen]
    for what, patterns in (('rank_pattern', cfg.rank_pattern),
                           ('alpha_pattern', cfg.alpha_pattern)):
        for pattern in patterns:
            if not any(match_name(n, pattern) for n in adapted):
                raise ValueError(f'{what} key {pattern!r} matches no adapted layer; '
                                 f'adapted: {abbreviate_names(adapted)}')
    if cfg.qkv_enable is not None and not any(_is_fused_qkv(n) for n in adapted):
        raise ValueError('qkv_enable is set but no adapted layer is a fused qkv '
                         f"projection (name ending in 'qkv'); adapted: "
                         f'{abbreviate_names(adapted)}')


def _is_fused_qkv(name: str) -> bool:
    return name.rpartition('.')[2] == 'qkv'


# ----------------------------------------------------------------------- replacement
def _replace(model: nn.Module, chosen: Candidates, cfg: LoRAConfig) -> List[str]:
    """Swap each chosen Linear for a LoRALinear copy with its rank / alpha / slices."""
    parents = dict(model.named_modules())
    done = []
    for name, module in chosen:
        rank_key = first_matching_pattern(name, cfg.rank_pattern)
        alpha_key = first_matching_pattern(name, cfg.alpha_pattern)
        slices = None
        if cfg.qkv_enable is not None and _is_fused_qkv(name):
            slices = list(cfg.qkv_enable)
        try:
            new = LoRALinear.from_linear(
                module,
                rank=cfg.rank_pattern[rank_key] if rank_key is not None else cfg.rank,
                alpha=(cfg.alpha_pattern[alpha_key]
                       if alpha_key is not None else cfg.lora_alpha),
                dropout=cfg.lora_dropout,
                use_rslora=cfg.use_rslora,
                init_lora_a=cfg.init_lora_a,
                enable_slices=slices)
        except ValueError as err:
            raise ValueError(f'cannot adapt {name!r}: {err}') from None
        parent_name, _, child = name.rpartition('.')
        setattr(parents[parent_name], child, new)
        done.append(name)
    return done
