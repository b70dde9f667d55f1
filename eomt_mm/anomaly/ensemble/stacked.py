"""Modules that run K ensemble members at once on a member-stacked batch.

In the query blocks and heads of an adapter ensemble the batch axis holds ``K * B`` rows,
member-major (rows ``k * B .. (k + 1) * B - 1`` belong to member ``k``). Every module that owns
member-specific tensors (LoRA matrices, trainable norms, heads) is replaced by one of these, with
the same parameter names, so state-dict keys stay those of the single model (member tensors gain a
leading ``K`` axis, shared frozen tensors are the very same parameters):

* :class:`StackedLoRALinear`: one shared base GEMM over all ``K * B`` rows, then the K adapters
  as two batched matrix products (``torch.bmm`` / ``torch.baddbmm`` with the stacked ``A`` and
  ``B``); LoRA dropout draws each member's mask from that member's own random stream.
* :class:`StackedModule`: any other parameter-owning leaf module (``Linear``, ``LayerNorm``,
  ``ConvTranspose2d``, ``Conv2d``, ``Embedding``...) evaluated with ``torch.func.vmap`` over
  ``torch.func.functional_call`` with the stacked tensors, so each member runs with its own
  weights in one batched call (vmap turns this into batched GEMMs / grouped convolutions).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from eomt_mm.lora.layer import LoRALinear, _dropout
from .rng import MemberStreams

__all__ = ['StackedLoRALinear', 'StackedModule', 'check_member_batch']


def check_member_batch(x: Tensor, num_members: int, where: str) -> int:
    """Rows per member of a member-stacked batch (a clear error when it does not divide).

    Args:
        x: Member-stacked tensor ``[K * B, ...]``.
        num_members: K.
        where: Module name for the message.

    Returns:
        B.
    """
    if x.shape[0] % num_members:
        raise ValueError(f'{where}: batch of {x.shape[0]} rows is not {num_members} members '
                         'stacked along the batch axis (member-major K * B rows)')
    return x.shape[0] // num_members


class StackedLoRALinear(nn.Module):
    """K LoRA adapters on one frozen ``nn.Linear``: ``y_k = W0 x_k + b + s_k B_k A_k drop_k(x_k)``.

    Args:
        layer: The single model's :class:`LoRALinear` (not merged, adapter enabled); its
            ``weight`` / ``bias`` parameters are shared as they are.
        lora_A: ``[K, r * slices, in]`` stacked down-projections.
        lora_B: ``[K, rows, r]`` stacked up-projections.
        scalings: One LoRA scaling per member (adapters may use different alphas).
        streams: Per-member random streams for dropout (None = torch's default generator).
    """

    def __init__(self, layer: LoRALinear, lora_A: Tensor, lora_B: Tensor,
                 scalings: Sequence[float], streams: Optional[MemberStreams] = None) -> None:
        super().__init__()
        if layer.merged:
            raise ValueError('an adapter ensemble needs unmerged LoRA layers; call unmerge() '
                             'on the base model first')
        if not layer.adapter_enabled:
            raise ValueError('an adapter ensemble runs its members\' adapters: build it with '
                             'lora_config.adapter_enabled=True')
        self.num_members = int(lora_A.shape[0])
        if lora_B.shape[0] != self.num_members or len(scalings) != self.num_members:
            raise ValueError('StackedLoRALinear: lora_A, lora_B and scalings disagree on the '
                             'number of members')
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.rank, self.dropout = layer.rank, layer.dropout
        self.enable_slices = layer.enable_slices
        self.weight = layer.weight
        self.bias = layer.bias
        self.lora_A = nn.Parameter(lora_A, requires_grad=layer.lora_A.requires_grad)
        self.lora_B = nn.Parameter(lora_B, requires_grad=layer.lora_B.requires_grad)
        self.scalings = [float(s) for s in scalings]
        self.streams = streams
        if self.enable_slices is not None:
            self.register_buffer('_lora_rows', layer._lora_rows.clone(), persistent=False)

    def _up_weights(self) -> Tensor:
        """``[K, out, r * slices]`` up-projections, each as :meth:`LoRALinear._up_weight`."""
        if self.enable_slices is None:
            return self.lora_B
        num_enabled = sum(self.enable_slices)
        blocks = self.lora_B.chunk(num_enabled, dim=1)  # each [K, chunk, r]
        chunk, rank = blocks[0].shape[1:]
        rows = []
        for j, block in enumerate(blocks):
            zeros_left = block.new_zeros(self.num_members, chunk, rank * j)
            zeros_right = block.new_zeros(self.num_members, chunk, rank * (num_enabled - j - 1))
            rows.append(torch.cat([zeros_left, block, zeros_right], dim=2))
        diagonal = torch.cat(rows, dim=1)  # block diagonal [K, chunk * s, r * s]
        full = diagonal.new_zeros(self.num_members, self.out_features, rank * num_enabled)
        return full.index_copy(1, self._lora_rows, diagonal)

    def _keep_masks(self, x: Tensor) -> Tensor:
        """Each member's keep mask, drawn from its own stream as a lone run would draw it.

        The draw is :class:`LoRALinear`'s own (``_dropout`` of :mod:`eomt_mm.lora.layer`), on
        each member's rows, so a member's masks are bit-identical to those of that member alone.
        """
        masks = []
        for k, rows in enumerate(x.chunk(self.num_members, dim=0)):
            if self.streams is None:
                masks.append(_dropout(rows.detach(), self.dropout)[1])
                continue
            with self.streams.member(k, x.device):
                masks.append(_dropout(rows.detach(), self.dropout)[1])
        return torch.cat(masks)

    def forward(self, x: Tensor) -> Tensor:
        """``[K * B, ..., in]`` -> ``[K * B, ..., out]``, member ``k`` with adapter ``k``."""
        check_member_batch(x, self.num_members, 'StackedLoRALinear')
        base = F.linear(x, self.weight, self.bias)
        if self.training and self.dropout > 0.0:
            x = x * self._keep_masks(x)
        down = torch.bmm(x.reshape(self.num_members, -1, self.in_features),
                         self.lora_A.transpose(1, 2))
        if self.training and self.dropout > 0.0:
            down = down * (1.0 / (1.0 - self.dropout))
        up = self._up_weights()
        if len(set(self.scalings)) == 1:
            out = torch.baddbmm(base.reshape(self.num_members, -1, self.out_features), down,
                                up.transpose(1, 2), alpha=self.scalings[0])
        else:
            scale = up.new_tensor(self.scalings).view(-1, 1, 1)
            out = torch.baddbmm(base.reshape(self.num_members, -1, self.out_features), down,
                                (up * scale).transpose(1, 2))
        return out.view(base.shape)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'rank={self.rank}, dropout={self.dropout:g}, members={self.num_members}')


class StackedModule(nn.Module):
    """A parameter-owning leaf module run by K members with their own tensors, batched.

    Args:
        module: The single model's module (a leaf: no children). Its tensors not in
            ``member_tensors`` are shared as they are; the module itself is kept out of the module
            tree as a stateless template for ``functional_call``.
        member_tensors: name -> ``[K, *shape]`` stacked values of its member-specific
            parameters / buffers.
    """

    def __init__(self, module: nn.Module, member_tensors: Dict[str, Tensor]) -> None:
        super().__init__()
        if any(True for _ in module.children()):
            raise TypeError(f'{type(module).__name__} has child modules; only leaf modules '
                            '(Linear, LayerNorm, Conv, Embedding...) can hold member-specific '
                            'tensors in an adapter ensemble')
        sizes = {int(t.shape[0]) for t in member_tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f'member tensors of one module disagree on K: {sorted(sizes)}')
        self.num_members = sizes.pop()
        self.member_names = tuple(member_tensors)
        self.inner_type = type(module).__name__
        for name, param in module._parameters.items():
            if param is None:
                continue
            if name in member_tensors:
                param = nn.Parameter(member_tensors[name], requires_grad=param.requires_grad)
            self.register_parameter(name, param)
        non_persistent = getattr(module, '_non_persistent_buffers_set', set())
        for name, buf in module._buffers.items():
            if buf is not None:
                self.register_buffer(name, member_tensors.get(name, buf),
                                     persistent=name not in non_persistent)
        # The template only supplies the forward code: every tensor comes from this module at
        # call time, so its own copies are replaced by meta tensors (no memory, never used).
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device='meta'),
                                                        requires_grad=False)
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = torch.empty_like(buf, device='meta')
        self._template = (module, )  # a tuple keeps it out of the module tree

    def forward(self, x: Tensor) -> Tensor:
        """``[K * B, ...]`` member-stacked input -> member-stacked output."""
        batch = check_member_batch(x, self.num_members, f'StackedModule({self.inner_type})')
        template = self._template[0]
        template.train(self.training)
        own = dict(self._parameters)
        own.update(self._buffers)
        shared = {n: t for n, t in own.items() if n not in self.member_names and t is not None}
        member = {n: own[n] for n in self.member_names}

        def run(tensors: Dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(template, {**shared, **tensors}, (inputs, ))

        out = vmap(run)(member, x.reshape(self.num_members, batch, *x.shape[1:]))
        return out.reshape(x.shape[0], *out.shape[2:])

    def extra_repr(self) -> str:
        return f'{self.inner_type}, members={self.num_members}, stacked={list(self.member_names)}'
