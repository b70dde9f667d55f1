"""Modules that run K ensemble members at once on a member-stacked batch.

In the query blocks and heads of an adapter ensemble the batch axis holds ``K * B`` rows,
member-major (rows ``k * B .. (k + 1) * B - 1`` belong to member ``k``). Every module that owns
member-specific tensors (LoRA matrices, trainable norms, heads) is replaced by one of these, with
the same parameter names, so state-dict keys stay those of the single model (member tensors gain a
leading ``K`` axis, shared frozen tensors are the very same parameters):

* :class:`StackedLoRALinear`: one shared base GEMM over all ``K * B`` rows, then the K adapters
  as two batched matrix products (``torch.bmm`` / ``torch.baddbmm`` with the stacked ``A`` and
  ``B``); LoRA dropout draws each member's mask from that member's own random stream.
* :class:`StackedModule`: any other module owning member tensors (a leaf such as ``Linear``,
  ``LayerNorm``, ``Embedding``, or a whole head / upscaler), run in one of three ways
  (:attr:`StackedModule.strategy`):

  * ``'vmap'`` (linear layers, MLP heads): ``torch.func.vmap`` over
    ``torch.func.functional_call`` with the stacked tensors, one batched call (batched GEMMs);
  * ``'layer_norm'`` (``nn.LayerNorm``): one normalisation of all ``K * B`` rows, then each
    member's scale and shift in one broadcast ``addcmul``. vmap's layer-norm rule with batched
    weights copies the activations around the kernel and cost many times the norm itself;
  * ``'members_in_turn'`` (anything holding a convolution, e.g. the upscaler): the single-model
    code on each member's rows in turn. vmap folds members into convolution groups, and on CPU
    the layout copies around the grouped convolutions cost more than running the K members'
    convolutions one after another (``tools/benchmark/ensemble.py cost``).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from eomt_mm.lora.layer import LoRALinear, dropout_keep_mask
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

    Attributes:
        lora_parameter_names: Its LoRA matrices, for :func:`eomt_mm.lora.count_parameters`.
    """

    lora_parameter_names = ('lora_A', 'lora_B')

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

        The draw is :class:`LoRALinear`'s own (:func:`eomt_mm.lora.layer.dropout_keep_mask`),
        on each member's rows, so a member's masks are bit-identical to those of that member alone.
        """
        masks = []
        for k, rows in enumerate(x.chunk(self.num_members, dim=0)):
            if self.streams is None:
                masks.append(dropout_keep_mask(rows, self.dropout))
                continue
            with self.streams.member(k, x.device):
                masks.append(dropout_keep_mask(rows, self.dropout))
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
    """A module run by K members with their own tensors on member-stacked rows.

    Args:
        module: The single model's module: a leaf (``Linear``, ``LayerNorm``, ``Conv2d``,
            ``Embedding``...) or a container its parent calls as a module (an MLP head, an
            upscaler whose blocks may read their children's weights directly). Its own tensors
            and children move into this module, so state-dict keys stay those of the single model;
            member tensors are replaced by their stacked values, the others are shared as they
            are. A copy of ``module`` holding meta tensors (no memory), kept out of the module
            tree, supplies the forward code for ``functional_call``.
        member_tensors: Name relative to ``module`` (``weight``, ``0.conv1.bias``) ->
            ``[K, *shape]`` stacked values of its member-specific parameters / buffers.

    Attributes:
        strategy: ``'vmap'``, ``'layer_norm'`` or ``'members_in_turn'`` (module docstring).
    """

    def __init__(self, module: nn.Module, member_tensors: Dict[str, Tensor]) -> None:
        super().__init__()
        sizes = {int(t.shape[0]) for t in member_tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f'member tensors of one module disagree on K: {sorted(sizes)}')
        self.num_members = sizes.pop()
        self.member_names = tuple(member_tensors)
        self.inner_type = type(module).__name__
        # deepcopy's memo maps every tensor to a meta stand-in, so no data is copied.
        memo = {id(p): nn.Parameter(torch.empty_like(p, device='meta'), requires_grad=False)
                for p in module.parameters()}
        memo.update({id(b): torch.empty_like(b, device='meta') for b in module.buffers()})
        self._template = (copy.deepcopy(module, memo), )  # a tuple keeps it out of the tree
        for name, param in module._parameters.items():
            if param is not None:
                self.register_parameter(name, param)
        non_persistent = getattr(module, '_non_persistent_buffers_set', set())
        for name, buf in module._buffers.items():
            if buf is not None:
                self.register_buffer(name, buf, persistent=name not in non_persistent)
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, value in member_tensors.items():
            owner_name, _, leaf = name.rpartition('.')
            owner = self.get_submodule(owner_name)
            if leaf in owner._parameters:
                old = owner._parameters[leaf]
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
            elif leaf in owner._buffers:
                owner._buffers[leaf] = value
            else:
                raise KeyError(f'{self.inner_type} has no parameter or buffer {name!r}')

        self.strategy = _strategy(module, self.member_names)

    def forward(self, x: Tensor) -> Tensor:
        """``[K * B, ...]`` member-stacked input -> member-stacked output."""
        batch = check_member_batch(x, self.num_members, f'StackedModule({self.inner_type})')
        template = self._template[0]
        template.train(self.training)
        shared = dict(self.named_parameters(remove_duplicate=False))
        shared.update(self.named_buffers(remove_duplicate=False))
        member = {n: shared.pop(n) for n in self.member_names}
        if self.strategy == 'layer_norm':
            return _stacked_layer_norm(template, {**shared, **member}, x, self.num_members)

        def run(tensors: Dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(template, {**shared, **tensors}, (inputs, ))

        if self.strategy == 'members_in_turn':
            return torch.cat([run({n: t[k] for n, t in member.items()}, rows)
                              for k, rows in enumerate(x.split(batch))])
        out = vmap(run)(member, x.reshape(self.num_members, batch, *x.shape[1:]))
        return out.reshape(x.shape[0], *out.shape[2:])

    def extra_repr(self) -> str:
        return (f'{self.inner_type}, members={self.num_members}, {self.strategy}, '
                f'stacked={list(self.member_names)}')


def _strategy(module: nn.Module, member_names: Sequence[str]) -> str:
    """How :class:`StackedModule` runs the members of ``module`` (see its docstring)."""
    if (isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward
            and set(member_names) <= {'weight', 'bias'}):
        return 'layer_norm'
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()):
        return 'members_in_turn'
    return 'vmap'


def _stacked_layer_norm(template: nn.LayerNorm, tensors: Dict[str, Tensor], x: Tensor,
                        num_members: int) -> Tensor:
    """``nn.LayerNorm`` of K members: one normalisation of all rows, then each member's affine.

    Args:
        template: The single model's layer norm (shape and eps).
        tensors: ``weight`` / ``bias`` (``[K, *shape]`` for member tensors, else shared).
        x: Member-stacked rows ``[K * B, ..., *shape]``.
        num_members: K.

    Returns:
        ``[K * B, ..., *shape]``.
    """
    shape = tuple(template.normalized_shape)
    normed = F.layer_norm(x, shape, None, None, template.eps)
    rows = normed.view(num_members, -1, *x.shape[1:])
    # A member tensor [K, *shape] lines up with rows [K, B, ..., *shape] through singleton axes.
    axes = (1, ) * (x.dim() - len(shape))

    def member_view(tensor: Tensor) -> Tensor:
        return tensor.view(num_members, *axes, *shape) if tensor.dim() > len(shape) else tensor

    weight, bias = tensors.get('weight'), tensors.get('bias')
    if weight is not None and bias is not None:
        rows = torch.addcmul(member_view(bias), rows, member_view(weight))
    elif weight is not None:
        rows = rows * member_view(weight)
    elif bias is not None:
        rows = rows + member_view(bias)
    return rows.reshape(x.shape)
