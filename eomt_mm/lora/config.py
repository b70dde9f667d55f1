"""``lora_config``: the one validation of the LoRA config block.

Every entry point (``apply_lora``, ``inject_lora``, ``freeze_base_model``, the ``WithLoRA``
builder) validates its arguments by building a :class:`LoRAConfig`, once; the code that
injects and freezes then trusts the validated values. This module imports no other LoRA
module except the layer's argument checks and the pattern checks of
:mod:`eomt_mm.lora.matching`, so everything can import it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .layer import _INIT_LORA_A, _check_lora_args
from .matching import DEFAULT_TARGETS, check_pattern, check_trainable_pattern

__all__ = ['LoRAConfig', 'LORA_CONFIG_ATTR']

# Attribute under which apply_lora records the (plain-dict) config on the model, so
# adapter files can store it without the caller passing it again.
LORA_CONFIG_ATTR = '_lora_config'


@dataclass
class LoRAConfig:
    """Validated ``lora_config``.

    Which names the pattern keys select is documented in one table in
    :mod:`eomt_mm.lora.matching`.

    Args:
        enabled (bool): Apply LoRA at all. Defaults to True.
        rank (int): Adapter rank (> 0). Defaults to 8.
        lora_alpha (float): Adapter alpha (> 0); scaling ``alpha / rank``. Defaults to 16.
        lora_dropout (float): Adapter-input dropout in ``[0, 1)``. Defaults to 0.0.
        target_modules (list[str]): Layer patterns (the default LoRA targets ``qkv``,
            ``proj``, ``fc1``, ``fc2``; dotted suffixes; full-match regexes). Defaults to
            the four default LoRA targets.
        freeze_base_model (bool): Freeze the base after injection. Defaults to True.
        use_rslora (bool): ``alpha / sqrt(rank)`` scaling. Defaults to False.
        init_lora_a (str): ``'kaiming_uniform'`` or ``'gaussian'``.
        layers (int | list[int] | dict | None): Restrict to blocks (indices, negative =
            from the end, ``{'last': N}``). Defaults to None (all blocks).
        exclude_modules (list[str]): Patterns never adapted. Defaults to [].
        rank_pattern (dict[str, int]): Per-pattern rank overrides. Defaults to {}.
        alpha_pattern (dict[str, float]): Per-pattern alpha overrides. Defaults to {}.
        qkv_enable (list[bool] | None): Slices of fused ``qkv`` layers to adapt
            (``[True, False, True]`` = q and v). Defaults to None (all of q, k, v).
        base_prefixes (list[str]): The pretrained submodules: LoRA is injected and
            freezing applies only there; ``''`` = whole model. Defaults to
            ``['backbone']``.
        trainable_modules (list[str]): Modules/parameters inside the base kept
            trainable (exact names or full-match regexes). Defaults to [].
        trainable_norms (bool): Keep the base's norm layers trainable (by type).
            Defaults to True.
        adapter_enabled (bool): The config switch of ``disable_adapters``: False builds the
            adapted model (LoRA keys still load from a checkpoint) with every adapter
            switched off, so it computes the base model's outputs. Defaults to True.
        train_adapters (bool): Whether the LoRA matrices train. False keeps the adapters
            (e.g. loaded from a LoRA-trained checkpoint) but frozen, so that only
            ``trainable_modules`` and the modules outside the base train (RbA's released
            outlier-exposure recipe trains the mask MLP only). Defaults to True.
    """

    enabled: bool = True
    rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    freeze_base_model: bool = True
    use_rslora: bool = False
    init_lora_a: str = 'kaiming_uniform'
    layers: Union[None, int, List[int], Dict[str, int]] = None
    exclude_modules: List[str] = field(default_factory=list)
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    qkv_enable: Optional[List[bool]] = None
    base_prefixes: List[str] = field(default_factory=lambda: ['backbone'])
    trainable_modules: List[str] = field(default_factory=list)
    trainable_norms: bool = True
    adapter_enabled: bool = True
    train_adapters: bool = True

    def __post_init__(self) -> None:
        for key in ('enabled', 'freeze_base_model', 'use_rslora', 'trainable_norms',
                    'adapter_enabled', 'train_adapters'):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f'lora_config.{key} must be a bool, got '
                                 f'{getattr(self, key)!r}')
        if self.init_lora_a not in _INIT_LORA_A:
            raise ValueError(f'lora_config.init_lora_a must be one of {_INIT_LORA_A}, '
                             f'got {self.init_lora_a!r}')
        try:
            _check_lora_args(self.rank, self.lora_alpha, self.lora_dropout,
                             self.init_lora_a)
        except ValueError as err:
            raise ValueError(f'lora_config: {err}') from None
        self.target_modules = self._str_list('target_modules', self.target_modules)
        if not self.target_modules:
            raise ValueError('lora_config.target_modules is empty; name at least one '
                             "layer pattern, e.g. ['qkv', 'proj', 'fc1', 'fc2']")
        self.exclude_modules = self._str_list('exclude_modules', self.exclude_modules)
        self.base_prefixes = self._str_list('base_prefixes', self.base_prefixes,
                                            allow_empty_str=True)
        if not self.base_prefixes:
            raise ValueError("lora_config.base_prefixes is empty; use ['backbone'] or "
                             "[''] for the whole model")
        self.trainable_modules = self._str_list('trainable_modules',
                                                self.trainable_modules)
        for pattern in self.trainable_modules:
            check_trainable_pattern(pattern, 'lora_config.trainable_modules')
        for key in ('target_modules', 'exclude_modules'):
            for pattern in getattr(self, key):
                check_pattern(pattern, f'lora_config.{key}')
        for key, kind in (('rank_pattern', 'rank'), ('alpha_pattern', 'alpha')):
            value = getattr(self, key)
            if not isinstance(value, Mapping):
                raise ValueError(f'lora_config.{key} must be a dict pattern -> {kind}, '
                                 f'got {value!r}')
            value = dict(value)
            for pattern, override in value.items():
                check_pattern(pattern, f'lora_config.{key}')
                try:
                    if kind == 'rank':
                        _check_lora_args(override, 1.0, 0.0, 'gaussian')
                    else:
                        _check_lora_args(1, override, 0.0, 'gaussian')
                except ValueError as err:
                    raise ValueError(f'lora_config.{key}[{pattern!r}]: {err}') from None
            setattr(self, key, value)
        if self.qkv_enable is not None:
            slices = self.qkv_enable
            if (isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence)
                    or not slices or not all(isinstance(b, bool) for b in slices)
                    or not any(slices)):
                raise ValueError('lora_config.qkv_enable must be a list of bools with at '
                                 f'least one True (e.g. [True, False, True]), got {slices!r}')
            self.qkv_enable = list(slices)
        if isinstance(self.layers, Mapping):
            self.layers = dict(self.layers)
        elif isinstance(self.layers, (list, tuple)):
            self.layers = list(self.layers)
        elif self.layers is not None and (isinstance(self.layers, bool)
                                          or not isinstance(self.layers, int)):
            raise ValueError('lora_config.layers must be None, an int, a list of ints or '
                             f"{{'last': N}}, got {self.layers!r}")

    @staticmethod
    def _str_list(key: str, value: Any, allow_empty_str: bool = False) -> List[str]:
        """``value`` as a list of strings (a lone string becomes a one-item list).

        Args:
            key (str): The config key, for messages.
            value (Any): What the config holds.
            allow_empty_str (bool): Accept ``''`` (``base_prefixes``: the whole model).

        Returns:
            list[str]: The entries.
        """
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence):
            raise ValueError(f'lora_config.{key} must be a list of strings, got {value!r}')
        out = list(value)
        for v in out:
            if not isinstance(v, str) or (not v and not allow_empty_str):
                raise ValueError(f'lora_config.{key} entries must be non-empty strings, '
                                 f'got {v!r}')
        return out

    @classmethod
    def valid_keys(cls) -> List[str]:
        """The keys a ``lora_config`` block may hold."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, cfg: Union[Mapping, 'LoRAConfig']) -> 'LoRAConfig':
        """Build from a (Config)dict, rejecting unknown keys with the list of valid ones.

        Args:
            cfg (Mapping | LoRAConfig): The config block; a LoRAConfig is returned as is
                (it was validated when it was built).

        Returns:
            LoRAConfig: The validated config.
        """
        if isinstance(cfg, LoRAConfig):
            return cfg
        if not isinstance(cfg, Mapping):
            raise TypeError(f'lora_config must be a dict, got {type(cfg).__name__}')
        valid = cls.valid_keys()
        unknown = [k for k in cfg if k not in valid]
        if unknown:
            raise ValueError(f'lora_config has unknown key(s) {unknown}; valid keys: {valid}')
        return cls(**{k: _plain(v) for k, v in cfg.items()})

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (round-trips through :meth:`from_dict`)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    """mmengine ConfigDict / tuples -> plain dicts / lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

