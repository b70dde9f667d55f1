"""Freezing the pretrained base of a LoRA model, and parameter counts for the log.

What stays trainable after :func:`freeze_base_model`:

* every LoRA matrix (``lora_A`` / ``lora_B`` of each :class:`LoRALinear`), wherever it is;
* every parameter **outside** the base prefixes (decode heads, queries, upscalers: they do
  not come from the pretrained checkpoint and must train);
* inside the base, the normalisation layers, selected by module **type**
  (``nn.LayerNorm`` and subclasses such as mmpretrain's ``LayerNorm2d``, ``nn.GroupNorm``,
  batch/instance norms, ``nn.RMSNorm``) when ``trainable_norms`` is True, because names
  differ between code bases (``ln1``, ``norm1``, ``pre_norm``) while types do not;
* inside the base, modules or parameters named in ``trainable_modules`` by exact
  qualified name or full-match regular expression (``backbone.pos_embed``,
  ``backbone\\.layers\\.(10|11)``): a module match keeps all of its parameters.

Nothing is matched by substring: a public LoRA fork of EoMT that matched by substring
(``'head' in name``, ``'norm' in name``) kept the wrong modules trainable and froze its
queries and upscaler. The matching rules are in one table in :mod:`eomt_mm.lora.matching`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from torch import nn

from .config import LoRAConfig
from .layer import LoRALinear
from .matching import check_prefixes, match_trainable, under_prefixes

__all__ = ['freeze_base_model', 'freeze_from_config', 'count_parameters', 'NORM_TYPES']

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
              nn.LocalResponseNorm) + ((nn.RMSNorm, ) if hasattr(nn, 'RMSNorm') else ())

_LORA_PARAMS = ('lora_A', 'lora_B')


def freeze_base_model(model: nn.Module,
                      base_prefixes: Sequence[str] = ('backbone', ),
                      trainable_modules: Optional[Sequence[str]] = None,
                      trainable_norms: bool = True) -> List[str]:
    """Set ``requires_grad=False`` on the pretrained base except LoRA and chosen modules.

    Args:
        model (nn.Module): The model (LoRA already injected), modified in place.
        base_prefixes (Sequence[str]): Qualified names of the pretrained submodules;
            ``''`` is the whole model. Parameters elsewhere are left as they are.
            Defaults to ``('backbone',)``.
        trainable_modules (Sequence[str] | None): Modules or parameters inside the base
            kept trainable, by exact qualified name or full-match regex. Each entry must
            match something inside the base. Defaults to None (none besides norms).
        trainable_norms (bool): Keep normalisation layers of the base (by type, see
            ``NORM_TYPES``) trainable. Defaults to True.

    Returns:
        list[str]: Names of the parameters now frozen.

    Raises:
        ValueError: A prefix that is not a submodule, a ``trainable_modules`` entry that
            is not a valid regex or matches nothing in the base (arguments are validated
            as the :class:`LoRAConfig` keys of the same names).
    """
    cfg = LoRAConfig(base_prefixes=base_prefixes,
                     trainable_modules=[] if trainable_modules is None else trainable_modules,
                     trainable_norms=trainable_norms)
    return freeze_from_config(model, cfg)


def freeze_from_config(model: nn.Module, cfg: LoRAConfig) -> List[str]:
    """:func:`freeze_base_model` with an already validated config (``apply_lora``'s path).

    Args:
        model (nn.Module): The model (LoRA already injected), modified in place.
        cfg (LoRAConfig): The validated config; its ``base_prefixes``,
            ``trainable_modules``, ``trainable_norms`` and ``train_adapters`` are used.

    Returns:
        list[str]: Names of the parameters now frozen.
    """
    prefixes = list(cfg.base_prefixes)
    check_prefixes(model, prefixes)
    patterns = list(cfg.trainable_modules)
    trainable_norms = cfg.trainable_norms
    keep_modules = set()
    hits = {p: 0 for p in patterns}
    for name, module in model.named_modules():
        if not under_prefixes(name, prefixes) or name == '':
            continue
        for pat in patterns:
            if match_trainable(name, pat):
                hits[pat] += 1
                keep_modules.add(name)
        if trainable_norms and isinstance(module, NORM_TYPES):
            keep_modules.add(name)

    frozen: List[str] = []
    for mod_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f'{mod_name}.{pname}' if mod_name else pname
            if isinstance(module, LoRALinear) and pname in _LORA_PARAMS:
                param.requires_grad_(cfg.train_adapters)
                if not cfg.train_adapters:
                    frozen.append(full)
                continue
            if not under_prefixes(full, prefixes):
                continue
            keep = False
            for pat in patterns:
                if match_trainable(full, pat):
                    hits[pat] += 1
                    keep = True
            # A parameter is kept if its module or any ancestor module is kept.
            parts = mod_name.split('.') if mod_name else []
            ancestors = ['.'.join(parts[:i]) for i in range(len(parts), 0, -1)]
            if keep or any(a in keep_modules for a in ancestors):
                continue
            param.requires_grad_(False)
            frozen.append(full)

    unmatched = [p for p, c in hits.items() if c == 0]
    if unmatched:
        raise ValueError(f'trainable_modules {unmatched} match no module or parameter '
                         f'inside the base {prefixes}; use exact qualified names '
                         "(e.g. 'backbone.ln1') or full-match regexes")
    return frozen


def count_parameters(model: nn.Module) -> Dict[str, float]:
    """Parameter counts for logging.

    Args:
        model (nn.Module): Any model (wrappers are the caller's business).

    Returns:
        dict: ``total``, ``trainable`` and ``lora`` (elements of LoRA matrices) as ints,
        and ``trainable_pct`` = 100 * trainable / total (0.0 for an empty model).
        Shared parameters are counted once. LoRA matrices are those of every
        :class:`LoRALinear` and of every module that names its own in a
        ``lora_parameter_names`` attribute (layers holding several adapters at once, such as
        the stacked layers of an adapter ensemble, which this package does not import).
    """
    lora_ids = set()
    for module in model.modules():
        names = (_LORA_PARAMS if isinstance(module, LoRALinear) else getattr(
            module, 'lora_parameter_names', ()))
        lora_ids.update(id(p) for n, p in module.named_parameters(recurse=False) if n in names)
    total = trainable = lora = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
        if id(p) in lora_ids:
            lora += n
    pct = 100.0 * trainable / total if total else 0.0
    return dict(total=total, trainable=trainable, lora=lora, trainable_pct=pct)
