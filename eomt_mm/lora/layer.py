"""``LoRALinear``: a drop-in replacement for ``nn.Linear`` with a low-rank adapter.

Design notes (why this is not PEFT's or loralib's layer):

* It *is* an ``nn.Linear`` (subclass) with ``weight`` and ``bias``: plain checkpoints load
  unchanged, ``isinstance(m, nn.Linear)`` code works, mmengine's ``layer='Linear'`` init
  touches only the base.
* The unmerged forward never materialises ``B @ A``: it runs
  ``addmm(base_out, A x, B^T, alpha=scaling)``, so the up-projection and the residual add
  are one fused GEMM instead of a GEMM, a scale and an add over the whole output.
* Dropout on the adapter input (``dropout > 0`` in training) goes through
  :class:`_DropoutDownProj`, an autograd function that draws the mask once and keeps it as
  one byte per element, next to one input-sized tensor (see its docstring); PEFT's
  ``Dropout -> Linear`` keeps the dropped copy plus its own mask, a float tensor on CPU.
  Under ``torch.compile`` plain dropout is used, so that the compiler's partitioner sees
  an ordinary dropout and chooses what to keep for backward.
* ``enable_slices`` adapts only some equal chunks of ``out_features`` (fused ``qkv``: q and
  v only), one independent rank-``r`` pair per adapted chunk (as the LoRA paper's ``W_q`` /
  ``W_v`` adapters and loralib's ``MergedLinear``); disabled chunks get a zero update.
* ``merge()`` folds ``scaling * B A`` into ``weight``; a merged layer runs exactly
  ``F.linear(x, weight, bias)``. Training a merged layer with autograd on raises: its LoRA
  matrices would get no gradient and an update of ``weight`` would corrupt the base once
  unmerged; an implicit unmerge in ``forward`` would hide a costly, lossy weight edit.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor, nn

__all__ = ['LoRALinear', 'dropout_keep_mask']

_INIT_LORA_A = ('kaiming_uniform', 'gaussian')


@torch.no_grad()
def _dropout(x: Tensor, p: float) -> Tuple[Tensor, Tensor]:
    """Unscaled dropout: ``(x * keep, keep)``, ``keep`` a uint8 0/1 mask of ``x``'s shape.

    Not differentiable (:class:`_DropoutDownProj` defines the gradients). Each element is
    kept with probability ``1 - p`` (``p`` resolved to ``2**-32``). The bits come from
    torch's default generator of ``x``'s device, so ``torch.manual_seed`` makes runs
    reproducible and activation checkpointing (which restores that generator's state before
    recomputing) redraws the same mask.

    Written here rather than with ``bernoulli_`` because torch's CPU ``bernoulli_`` draws
    one 64-bit number per element (through a double) and dominated the cost of a dropout
    step: here one 64-bit draw of ``random_`` serves two elements, each half compared as a
    uniform int32 with the threshold of ``p``. The mask is uint8 rather than bool because
    CPU kernels convert uint8 to floating point several times faster than bool.
    """
    bits, keep = _draw_keep(x, p)
    if x.dtype == torch.float32:
        # Reuse the spent random bits' buffer (4 bytes per element, as fp32): no new tensor.
        return torch.mul(x, keep, out=bits.view(torch.float32).view(x.shape)), keep
    return x * keep, keep


def _draw_keep(x: Tensor, p: float) -> Tuple[Tensor, Tensor]:
    """``(bits, keep)``: the int32 random words spent and the uint8 keep mask (see _dropout)."""
    numel = x.numel()  # one int32 word per element, plus one to fill whole int64s if odd
    bits = torch.empty(numel + numel % 2, dtype=torch.int32, device=x.device).view(
        torch.int64).random_(-2**63, None).view(torch.int32)[:numel]
    threshold = min(-2**31 + round(p * 2**32), 2**31 - 1)
    return bits, (bits >= threshold).view(torch.uint8).view(x.shape)


def dropout_keep_mask(x: Tensor, p: float) -> Tensor:
    """The uint8 0/1 keep mask (``x``'s shape) that :class:`LoRALinear`'s dropout draws for ``x``.

    Args:
        x: An adapter input (shape and device used; the device's default generator draws).
        p: Dropout probability in ``[0, 1)``.
    """
    return _draw_keep(x, p)[1]


def _gemm_dtype(x: Tensor) -> torch.dtype:
    """Dtype autocast would run ``F.linear(x, ...)`` in (``x.dtype`` outside autocast)."""
    device_type = x.device.type
    if (torch.is_autocast_enabled(device_type) and x.is_floating_point()
            and x.dtype != torch.float64):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _DropoutDownProj(torch.autograd.Function):
    """``F.linear(dropout(x, p), A)`` that keeps a one-byte keep-mask for backward.

    Forward draws the mask and computes the dropped input once. What is saved depends on
    ``input_kept``: whether the caller keeps ``x`` for backward (``F.linear`` does when its
    weight trains):

    * ``input_kept=False`` (frozen base, the LoRA case): the dropped input, in the dtype
      the GEMM ran in, plus the mask. ``x`` itself is not kept, so the adapter costs one
      input-sized tensor plus one byte per element, where ``Dropout -> Linear`` keeps the
      dropped copy plus its own mask (a float tensor on CPU).
    * ``input_kept=True``: ``x`` (shared with the base layer, so free) plus the mask, and
      backward recomputes the dropped input with one masked pass over ``x``.

    The mask is saved through ``save_for_backward``, never as a ``ctx`` attribute, so
    saved-tensor hooks (activation checkpointing, offloading) see every saved tensor.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lora_a: Tensor, p: float, input_kept: bool) -> Tensor:
        dropped, keep = _dropout(x, p)
        dropped = dropped.to(_gemm_dtype(x))
        # The 1/(1-p) rescale is applied on the r-wide output, the cheapest place.
        out = F.linear(dropped, lora_a).mul_(1.0 / (1.0 - p))
        need_x_grad, need_a_grad = ctx.needs_input_grad[:2]
        if input_kept:
            ctx.save_for_backward(x if need_a_grad else None,
                                  keep if need_x_grad or need_a_grad else None, lora_a)
        else:
            ctx.save_for_backward(dropped if need_a_grad else None,
                                  keep if need_x_grad else None, lora_a)
        ctx.p, ctx.input_kept, ctx.x_dtype = p, input_kept, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved_input, keep, lora_a = ctx.saved_tensors
        # Scale folded into the small operands (A: r x in, grad: N x r) so that no extra
        # pass over an input-sized tensor is spent on it.
        grad_s = grad_out * (1.0 / (1.0 - ctx.p))
        # Backward runs outside autocast: compute in the gradient's dtype explicitly.
        dtype = grad_out.dtype
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_s @ lora_a.to(dtype)).mul_(keep).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dropped = (saved_input * keep if ctx.input_kept else saved_input).to(dtype)
            grad_a = (grad_s.reshape(-1, grad_s.shape[-1]).t()
                      @ dropped.reshape(-1, dropped.shape[-1])).to(lora_a.dtype)
        return grad_x, grad_a, None, None


@MODELS.register_module()
class LoRALinear(nn.Linear):
    """Linear layer with a low-rank adapter: ``y = W0 x + b + scaling * B A dropout(x)``.

    Args:
        in_features (int): Size of each input sample.
        out_features (int): Size of each output sample.
        bias (bool): Whether the base layer has a bias. Defaults to True.
        rank (int): Rank ``r`` of the adapter (> 0). Defaults to 8.
        alpha (float): Scaling numerator (> 0): ``scaling = alpha / r``, or
            ``alpha / sqrt(r)`` with ``use_rslora``. Defaults to 16.0.
        dropout (float): Dropout probability on the adapter input, in ``[0, 1)``.
            Applied only in training mode. Defaults to 0.0.
        use_rslora (bool): Use rank-stabilised scaling ``alpha / sqrt(r)``.
            Defaults to False.
        init_lora_a (str): ``'kaiming_uniform'`` (as ``nn.Linear``'s weight, ``a=sqrt(5)``)
            or ``'gaussian'`` (normal with std ``1 / r``). ``lora_B`` always starts at zero.
            Defaults to ``'kaiming_uniform'``.
        enable_slices (Sequence[bool] | None): Split ``out_features`` into
            ``len(enable_slices)`` equal chunks and adapt only the chunks marked True
            (fused qkv: ``[True, False, True]`` = q and v). Each adapted chunk gets its own
            rank-``r`` pair: with ``k`` chunks enabled, ``lora_A`` is ``(r * k) x in`` and
            ``lora_B`` is ``(chunk * k) x r``. None adapts the whole output (``lora_A``
            ``r x in``, ``lora_B`` ``out x r``). Defaults to None.
        device (torch.device | str | None): Device of the parameters.
        dtype (torch.dtype | None): Dtype of the parameters.

    Attributes:
        merged (bool): Whether the adapter is folded into ``weight``.
        adapter_enabled (bool): When False the layer computes only the base ``W0 x + b``
            (used by ``disable_adapters``). A merged layer must be unmerged first.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_a: str = 'kaiming_uniform',
                 enable_slices: Optional[Sequence[bool]] = None, device=None, dtype=None) -> None:
        _check_lora_args(rank, alpha, dropout, init_lora_a)
        slices = _check_slices(enable_slices, out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.init_lora_a = init_lora_a
        self.enable_slices = slices
        self.scaling = (self.alpha / math.sqrt(self.rank)
                        if self.use_rslora else self.alpha / self.rank)
        self.merged = False
        self.adapter_enabled = True

        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        if slices is None:
            num_enabled_slices, rows_out = 1, out_features
        else:
            chunk = out_features // len(slices)
            num_enabled_slices = sum(slices)
            rows_out = chunk * num_enabled_slices
            rows = torch.cat([torch.arange(i * chunk, (i + 1) * chunk)
                              for i, on in enumerate(slices) if on])
            # Non-persistent: follows .to(device) but stays out of the state dict.
            self.register_buffer('_lora_rows', rows.to(factory['device']),
                                 persistent=False)
        self.lora_A = nn.Parameter(
            torch.empty(self.rank * num_enabled_slices, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(rows_out, self.rank, **factory))
        self.reset_lora_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Re-initialise base weights as ``nn.Linear`` does, and the adapter."""
        super().reset_parameters()
        # nn.Linear.__init__ calls this before the LoRA matrices exist.
        if 'lora_A' in self._parameters:
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Initialise ``lora_A`` (kaiming-uniform or gaussian) and zero ``lora_B``."""
        if self.merged:
            raise RuntimeError(
                'LoRALinear.reset_lora_parameters() on a merged layer would make '
                'unmerge() restore wrong base weights; call unmerge() first.')
        with torch.no_grad():
            if self.init_lora_a == 'kaiming_uniform':
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **lora_kwargs) -> 'LoRALinear':
        """Build a LoRALinear holding a copy of ``linear``'s weights.

        The copy lives on ``linear``'s device with its dtype and keeps the
        ``requires_grad`` flags and train/eval mode of the original.

        Args:
            linear (nn.Linear): The layer to adapt (not modified).
            **lora_kwargs: ``rank``, ``alpha``, ``dropout``, ``use_rslora``,
                ``init_lora_a``, ``enable_slices`` as in the constructor.

        Returns:
            LoRALinear: The adapted layer; equal to ``linear`` at initialisation.
        """
        if isinstance(linear, LoRALinear):
            raise TypeError('from_linear() got a LoRALinear; adapters are never nested.')
        if not isinstance(linear, nn.Linear):
            raise TypeError(f'from_linear() expects nn.Linear, got {type(linear).__name__}.')
        # Built on the meta device so the base weight is not randomly initialised
        # only to be overwritten by the copy.
        layer = cls(linear.in_features, linear.out_features,
                    bias=linear.bias is not None, device='meta',
                    dtype=linear.weight.dtype, **lora_kwargs)
        layer = layer.to_empty(device=linear.weight.device)
        if layer.enable_slices is not None:
            chunk = layer.out_features // len(layer.enable_slices)
            layer._lora_rows = torch.cat([torch.arange(i * chunk, (i + 1) * chunk)
                                          for i, on in enumerate(layer.enable_slices) if on
                                          ]).to(linear.weight.device)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reset_lora_parameters()
        layer.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        layer.train(linear.training)
        return layer

    # --------------------------------------------------------------- compute
    def _up_weight(self) -> Tensor:
        """The ``out x (r * num_enabled_slices)`` up-projection; zero rows are not adapted."""
        if self.enable_slices is None:
            return self.lora_B
        num_enabled_slices = sum(self.enable_slices)
        blocks = torch.block_diag(*self.lora_B.chunk(num_enabled_slices, dim=0))
        full = self.lora_B.new_zeros(self.out_features, self.rank * num_enabled_slices)
        return full.index_copy(0, self._lora_rows, blocks)

    def delta_weight(self) -> Tensor:
        """``scaling * B A`` as an ``out x in`` tensor in ``weight``'s dtype.

        Computed in fp32 (at least) and cast, so merging low-precision weights does not
        also lose precision in the product. Rows of disabled slices are exactly zero.
        """
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self._up_weight().to(dtype) @ self.lora_A.to(dtype)
        return (delta * self.scaling).to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if not self.adapter_enabled:
                raise RuntimeError(
                    'LoRALinear: adapter disabled on a merged layer; the weight still '
                    'holds the adapter. Call unmerge() before disabling adapters.')
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    'LoRALinear: forward in training mode with autograd on a merged '
                    'layer: the LoRA matrices would get no gradient and updates to '
                    'weight would corrupt the base. Call unmerge() before training, or '
                    'use eval() / torch.no_grad() for inference.')
            return F.linear(x, self.weight, self.bias)
        base = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return base
        if self.dropout > 0.0 and self.training:
            if torch.compiler.is_compiling():
                down = F.linear(F.dropout(x, self.dropout, True), self.lora_A)
            else:
                # F.linear saves its input for the weight gradient when the base trains;
                # then the adapter shares that tensor instead of keeping a dropped copy.
                # Under autocast the base saves its own low-precision cast of x instead,
                # which cannot be shared.
                input_kept = (self.weight.requires_grad and torch.is_grad_enabled()
                              and _gemm_dtype(x) == x.dtype)
                down = _DropoutDownProj.apply(x, self.lora_A, self.dropout, input_kept)
        else:
            down = F.linear(x, self.lora_A)
        out = torch.addmm(base.reshape(-1, self.out_features),
                          down.reshape(-1, down.shape[-1]),
                          self._up_weight().t(),
                          alpha=self.scaling)
        return out.view(base.shape)

    # ----------------------------------------------------------------- merge
    def merge(self, safe: bool = False) -> None:
        """Fold ``scaling * B A`` into ``weight`` (no-op if already merged).

        Args:
            safe (bool): Compute the merged weight in a copy and refuse (RuntimeError)
                if it is not finite, leaving the layer untouched. Defaults to False.
        """
        if self.merged:
            return
        with torch.no_grad():
            if safe:
                merged_w = self.weight + self.delta_weight()
                if not torch.isfinite(merged_w).all():
                    raise RuntimeError(
                        'LoRALinear.merge(safe=True): merged weight has NaN/inf; '
                        'the adapter is broken. Layer left unmerged.')
                self.weight.copy_(merged_w)
            else:
                self.weight.add_(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``scaling * B A`` from ``weight`` (no-op if not merged).

        Exact up to floating-point rounding (fp32: ~1e-7 relative); not bit-exact,
        and noticeably lossy in fp16/bf16.
        """
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        s = (f'{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, '
             f'scaling={self.scaling:g}, dropout={self.dropout:g}')
        if self.use_rslora:
            s += ', use_rslora=True'
        if self.enable_slices is not None:
            s += f', enable_slices={list(self.enable_slices)}'
        if self.merged:
            s += ', merged=True'
        return s


def _check_lora_args(rank, alpha, dropout, init_lora_a) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f'LoRA rank must be a positive int, got {rank!r}.')
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f'LoRA alpha must be a number > 0, got {alpha!r}.')
    if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
            or not 0.0 <= dropout < 1.0):
        raise ValueError(f'LoRA dropout must be in [0, 1), got {dropout!r}.')
    if init_lora_a not in _INIT_LORA_A:
        raise ValueError(f'init_lora_a must be one of {_INIT_LORA_A}, got {init_lora_a!r}.')


def _check_slices(enable_slices, out_features: int):
    if enable_slices is None:
        return None
    slices = tuple(enable_slices)
    if not slices or not all(isinstance(s, bool) for s in slices):
        raise ValueError('enable_slices must be a non-empty sequence of bools, '
                         f'got {enable_slices!r}.')
    if not any(slices):
        raise ValueError(f'enable_slices={list(slices)} adapts nothing; '
                         'mark at least one slice True.')
    if out_features % len(slices):
        raise ValueError(f'out_features={out_features} is not divisible into '
                         f'{len(slices)} equal slices (enable_slices={list(slices)}).')
    return slices
