"""Which tensors the ensemble members own, the refusal of prefix adapters, and member values.

A member's tensors are the adapter entries of the single model
(:func:`eomt_mm.lora.adapters.adapter_state_keys`): LoRA matrices, trainable parameters and
their modules' buffers. For the prefix to be shared, none of them may lie in the blocks before
the first query block or in the embedding stage before block 0; the final norm after the last
block and everything outside the backbone (queries, heads) are per member.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from eomt_mm.lora.adapters import (AdapterMismatchError, adapter_bank, check_same_base,
                                   read_adapter)
from eomt_mm.lora.layer import LoRALinear
from eomt_mm.lora.matching import block_index
from .rng import MemberStreams
from .stacked import StackedLoRALinear, StackedModule

__all__ = ['PrefixAdapterError', 'final_norm_modules', 'check_prefix_free', 'initial_values',
           'stack_members', 'read_member', 'set_member', 'member_values', 'check_member_base']


class PrefixAdapterError(ValueError):
    """An adapter changes a tensor the shared prefix uses: the members could not share it."""


def final_norm_modules(model: nn.Module) -> Set[str]:
    """Qualified names of the backbone modules that ``backbone.final_norm`` runs.

    Found by running it once on a dummy token, so any backbone with the block-level API works.
    """
    called: Set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: called.add(name))
               for name, m in model.backbone.named_modules() if name]
    try:
        with torch.no_grad():
            probe = next(model.backbone.parameters())
            model.backbone.final_norm(probe.new_zeros(1, 1, model.backbone.embed_dims))
    finally:
        for handle in handles:
            handle.remove()
    return {f'backbone.{name}' for name in called}


def check_prefix_free(model: nn.Module, keys: Sequence[str], source: str,
                      final_norm: Set[str]) -> None:
    """Refuse adapter tensors that the shared prefix would use.

    Args:
        model: The EoMT model (``first_query_block``, ``backbone``).
        keys: Adapter state-dict keys.
        source: Where the keys came from, for the message.
        final_norm: :func:`final_norm_modules` of the model.

    Raises:
        PrefixAdapterError: Naming the first offending block (or embedding tensor).
    """
    first = model.first_query_block
    advice = (f"Train ensemble members with LoRA on the query blocks only (lora_config.layers="
              f"{{'last': {model.backbone.num_layers - first}}}) and nothing trainable below "
              "them (trainable_norms=False; trainable_modules limited to the query blocks and "
              "the final norm)")
    for key in keys:
        if not key.startswith('backbone.'):
            continue
        found = block_index(key)
        if found is not None:
            container, index = found
            if index < first:
                raise PrefixAdapterError(
                    f'{source}: {key!r} adapts block {index} ({container}.{index}), below the '
                    f'first query block {first}; the blocks 0-{first - 1} would no longer be '
                    f'shared by the ensemble members. {advice}.')
            continue
        if key.rsplit('.', 1)[0] not in final_norm:
            raise PrefixAdapterError(
                f'{source}: {key!r} is part of the embedding stage that runs before block 0; '
                f'the prefix would no longer be shared by the ensemble members. {advice}.')


def initial_values(model: nn.Module, keys: Sequence[str],
                   streams: MemberStreams) -> List[Dict[str, Tensor]]:
    """Members' starting tensors: the model's values, LoRA ``A`` redrawn from each stream.

    Member ``k`` re-initialises every LoRA layer (model order) from its own stream, exactly as
    ``torch.manual_seed(seed_k)`` followed by ``reset_lora_parameters()`` on each layer would.

    Args:
        model: The single model, LoRA injected, before stacking.
        keys: The member-specific keys.
        streams: The members' random streams.

    Returns:
        One ``key -> tensor`` dict per member.
    """
    live = dict(model.state_dict(keep_vars=True))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = {id(m): (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in layers}
    members = []
    for k in range(len(streams)):
        with streams.member(k, torch.device('cpu')), torch.no_grad():
            for layer in layers:
                layer.reset_lora_parameters()
        members.append({key: live[key].detach().clone() for key in keys})
    with torch.no_grad():
        for layer in layers:
            layer.lora_A.copy_(saved[id(layer)][0])
            layer.lora_B.copy_(saved[id(layer)][1])
    return members


#: Below these modules, a container holding only member tensors (``mask_head``, ``upscale``) is
#: stacked as one unit: ``EoMTDecoder.predict`` calls its heads and upscaler as modules, while
#: their insides may read a child's weights directly (``ScaleBlock`` computes its transposed
#: convolution as a GEMM on ``conv1.weight``), which a stacked child alone would not see. Elsewhere
#: (the backbone, whose blocks ``forward_block`` runs piece by piece) leaf modules are stacked.
_WHOLE_UNITS_BELOW = ('decoder', )


def _stacking_units(model: nn.Module, keys: Sequence[str]) -> Dict[str, List[str]]:
    """Module name -> its member keys (relative names) for each module to stack."""
    key_set = set(keys)
    modules = dict(model.named_modules())
    only_members: Dict[str, bool] = {}

    def holds_only_members(name: str) -> bool:
        if name not in only_members:
            module = modules[name]
            own = list(module.state_dict(keep_vars=True))
            only_members[name] = (bool(own) and all(f'{name}.{k}' in key_set for k in own)
                                  and not any(isinstance(m, LoRALinear) for m in module.modules()))
        return only_members[name]

    units: Dict[str, List[str]] = OrderedDict()
    for key in keys:
        unit = key.rpartition('.')[0]
        while not isinstance(modules[unit], LoRALinear):
            parent = unit.rpartition('.')[0]
            if not (any(parent.startswith(root + '.') for root in _WHOLE_UNITS_BELOW)
                    and holds_only_members(parent)):
                break
            unit = parent
        units.setdefault(unit, []).append(key[len(unit) + 1:])
    return units


def stack_members(model: nn.Module, members: Sequence[Mapping[str, Tensor]],
                  scalings: Sequence[Mapping[str, float]],
                  streams: MemberStreams) -> None:
    """Replace every module owning member-specific tensors by its stacked version, in place.

    Args:
        model: The single model (LoRA injected).
        members: One ``key -> tensor`` dict per member (same keys).
        scalings: Per member, LoRA layer name -> scaling.
        streams: The members' random streams (for LoRA dropout).
    """
    modules = dict(model.named_modules())
    for owner, names in _stacking_units(model, list(members[0])).items():
        module = modules[owner]
        stacked = {n: torch.stack([m[f'{owner}.{n}'] for m in members]) for n in names}
        if isinstance(module, LoRALinear):
            if set(names) - {'lora_A', 'lora_B'}:
                raise ValueError(f'{owner}: its base weights are trainable; an adapter ensemble '
                                 'shares a frozen base (freeze_base_model=True)')
            new = StackedLoRALinear(module, stacked['lora_A'], stacked['lora_B'],
                                    [s[owner] for s in scalings], streams)
        else:
            new = StackedModule(module, stacked)
        parent, _, child = owner.rpartition('.')
        setattr(modules[parent] if parent else model, child, new)


MemberRead = Tuple[Dict[str, Tensor], Dict[str, float], Optional[Dict[str, Any]]]


def read_member(source: str, layout: Mapping[str, Tuple[int, ...]], model: nn.Module,
                bank_model: Optional[nn.Module] = None) -> MemberRead:
    """One member's tensors from an adapter folder or from a name in an adapter bank.

    Args:
        source: Adapter folder written by ``save_adapter``, or a name in ``bank_model``'s bank.
        layout: key -> shape of one member's tensors.
        model: The ensemble (for the prefix check; ``final_norm_names``).
        bank_model: A single model whose adapter bank holds named adapters.

    Returns:
        ``(tensors, LoRA layer -> scaling, adapter config or None)``.
    """
    bank = adapter_bank(bank_model, create=False) if bank_model is not None else None
    if bank is not None and source in bank.adapters:
        entry = bank.adapters[source]
        tensors = entry['tensors']
        scalings = {name: float(state[2]) for name, state in entry['scales'].items()}
        config = entry.get('config')
        label = f'adapter {source!r} of the adapter bank'
    else:
        tensors, config = read_adapter(source)
        scalings = {name: float(e['scaling']) for name, e in config['layers'].items()}
        label = f'adapter {source!r}'
    check_prefix_free(model, list(tensors), label, model.final_norm_names)
    problems = [f'missing {key!r} {list(shape)}' for key, shape in layout.items()
                if key not in tensors]
    problems += [f'unexpected {key!r} (not an adapter entry of the ensemble)'
                 for key in tensors if key not in layout]
    problems += [f'{key!r}: shape {list(tensors[key].shape)}, ensemble member shape '
                 f'{list(layout[key])}' for key in layout
                 if key in tensors and tuple(tensors[key].shape) != tuple(layout[key])]
    if problems:
        shown = '\n  - '.join(problems[:20])
        raise AdapterMismatchError(
            f'{label} does not fit the ensemble ({len(problems)} problem(s)):\n  - {shown}\n'
            'Every member must be trained with the lora_config of the ensemble config.')
    return {k: tensors[k] for k in layout}, scalings, config


def set_member(model: nn.Module, index: int, tensors: Mapping[str, Tensor],
               scalings: Mapping[str, float]) -> None:
    """Copy one member's tensors (and LoRA scalings) into the stacked modules."""
    live = dict(model.state_dict(keep_vars=True))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in tensors.items():
            live[key][index].copy_(value.to(dtype=live[key].dtype, device=live[key].device))
    for name, scaling in scalings.items():
        layer = modules.get(name)
        if isinstance(layer, StackedLoRALinear):
            layer.scalings[index] = float(scaling)


def member_values(model: nn.Module, index: int, keys: Sequence[str]) -> Dict[str, Tensor]:
    """Detached copies of member ``index``'s tensors, as a single model holds them."""
    live = dict(model.state_dict(keep_vars=True))
    return {key: live[key][index].detach().clone() for key in keys}


def check_member_base(model: nn.Module, config: Optional[Mapping[str, Any]], check_base: str,
                      source: str) -> None:
    """The base fingerprints of an adapter file against the ensemble's shared base."""
    if config is not None:
        check_same_base(model, config, check_base, source)
