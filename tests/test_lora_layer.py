"""LoRALinear: formula, initialisation, gradients, dropout memory, merge, slices, state dict."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from eomt_mm.lora import LoRALinear
from eomt_mm.lora.layer import _dropout, _DropoutDownProj


def _layer(in_f=16, out_f=24, rank=4, alpha=8.0, **kw):
    layer = LoRALinear(in_f, out_f, rank=rank, alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()  # non-zero B so the adapter contributes
    return layer


def _formula(layer, x, keep=None):
    """Reference y = W x + b + scaling * B A dropout(x), with per-slice pairs if sliced."""
    xd = x if keep is None else x * keep / (1 - layer.dropout)
    y = x @ layer.weight.t()
    if layer.bias is not None:
        y = y + layer.bias
    if layer.enable_slices is None:
        return y + layer.scaling * (xd @ layer.lora_A.t()) @ layer.lora_B.t()
    chunk = layer.out_features // len(layer.enable_slices)
    a_blocks = layer.lora_A.chunk(sum(layer.enable_slices), 0)
    b_blocks = layer.lora_B.chunk(sum(layer.enable_slices), 0)
    parts, k = [], 0
    for i, on in enumerate(layer.enable_slices):
        yi = y[..., i * chunk:(i + 1) * chunk]
        if on:
            yi = yi + layer.scaling * (xd @ a_blocks[k].t()) @ b_blocks[k].t()
            k += 1
        parts.append(yi)
    return torch.cat(parts, -1)


# ----------------------------------------------------------------------------- formula
@pytest.mark.parametrize('bias', [True, False])
def test_output_matches_formula(bias):
    layer = _layer(bias=bias).double()
    x = torch.randn(2, 5, 16, dtype=torch.double)
    assert layer.scaling == 8.0 / 4
    torch.testing.assert_close(layer(x), _formula(layer, x), rtol=1e-12, atol=1e-12)
    # 1-D input, like nn.Linear
    torch.testing.assert_close(layer(x[0, 0]), _formula(layer, x[0, 0]))


def test_rslora_scaling():
    layer = LoRALinear(8, 8, rank=16, alpha=8.0, use_rslora=True)
    assert layer.scaling == pytest.approx(8.0 / math.sqrt(16))
    assert LoRALinear(8, 8, rank=16, alpha=8.0).scaling == pytest.approx(0.5)


@pytest.mark.parametrize('init', ['kaiming_uniform', 'gaussian'])
def test_identity_at_init_and_init_statistics(init):
    base = nn.Linear(256, 32)
    layer = LoRALinear.from_linear(base, rank=4, alpha=8, init_lora_a=init)
    x = torch.randn(3, 7, 256)
    # lora_B == 0 -> the adapted layer equals the original bit for bit.
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.shape == (4, 256) and layer.lora_B.shape == (32, 4)
    a = layer.lora_A.detach()
    if init == 'kaiming_uniform':
        # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in), as nn.Linear's weight.
        assert a.abs().max() <= 1 / math.sqrt(256)
        assert a.abs().max() > 0.9 / math.sqrt(256)
    else:
        assert a.std().item() == pytest.approx(1 / 4, rel=0.1)


def test_reset_lora_parameters_zeroes_b():
    layer = _layer()
    assert torch.count_nonzero(layer.lora_B) > 0
    layer.reset_lora_parameters()
    assert torch.count_nonzero(layer.lora_B) == 0


# --------------------------------------------------------------------------- gradients
def test_gradients_only_on_lora_when_base_frozen():
    layer = _layer()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    # gradients equal the ones of the explicit formula
    ref = _layer()
    ref.load_state_dict(layer.state_dict())
    for p in ref.parameters():
        p.requires_grad_(p is ref.lora_A or p is ref.lora_B)
    x2 = x.detach().clone().requires_grad_(True)
    _formula(ref, x2).square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, ref.lora_A.grad)
    torch.testing.assert_close(layer.lora_B.grad, ref.lora_B.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_gradcheck_whole_layer():
    layer = _layer(8, 6, rank=2, alpha=3.0, enable_slices=[True, False, True]).double()
    x = torch.randn(3, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x, ))


@pytest.mark.parametrize('input_kept', [False, True])
def test_dropout_function_gradcheck_and_formula(input_kept):
    x = torch.randn(5, 7, dtype=torch.double, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.double, requires_grad=True)

    def down_proj(u, v):
        # re-seeded on every call -> the same mask each time, so numerical gradients are valid
        torch.manual_seed(1234)
        return _DropoutDownProj.apply(u, v, 0.3, input_kept)

    assert torch.autograd.gradcheck(down_proj, (x, a))
    torch.manual_seed(1234)
    keep = _dropout(x, 0.3)[1]
    torch.testing.assert_close(down_proj(x, a), F.linear(x * keep / 0.7, a))


def test_dropout_train_vs_eval_and_mask_statistics():
    layer = _layer(64, 32, dropout=0.25)
    x = torch.randn(50, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), _formula(layer, x))  # no dropout in eval
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    keep = _dropout(x, 0.25)[1]
    torch.testing.assert_close(y, _formula(layer, x, keep), rtol=1e-5, atol=1e-5)
    assert keep.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert not torch.allclose(y, _formula(layer, x), atol=1e-3)


def _frozen(layer, frozen_base):
    layer.weight.requires_grad_(not frozen_base)
    layer.bias.requires_grad_(not frozen_base)
    return layer


@pytest.mark.parametrize('frozen_base', [True, False])
def test_dropout_gradients_match_reference(frozen_base):
    layer = _frozen(_layer(16, 12, dropout=0.5).train(), frozen_base)
    x = torch.randn(2, 6, 16, requires_grad=True)
    torch.manual_seed(3)
    layer(x).square().sum().backward()
    torch.manual_seed(3)
    keep = _dropout(x, 0.5)[1]
    ref = _frozen(_layer(16, 12, dropout=0.5), frozen_base)
    ref.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    _formula(ref, x2, keep).square().sum().backward()
    pairs = [(layer.lora_A, ref.lora_A), (layer.lora_B, ref.lora_B), (x, x2)]
    if frozen_base:
        assert layer.weight.grad is None and layer.bias.grad is None
    else:
        pairs += [(layer.weight, ref.weight), (layer.bias, ref.bias)]
    for p, q in pairs:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('frozen_base', [True, False])
def test_dropout_mask_reproduced_under_activation_checkpointing(frozen_base):
    layer = _frozen(_layer(16, 12, dropout=0.3).train(), frozen_base)
    x = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(11)
    layer(x).sum().backward()
    grads = [layer.lora_A.grad.clone(), x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    torch.manual_seed(11)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, grads[0])
    torch.testing.assert_close(x.grad, grads[1])


def _saved_tensors(module, x):
    """Tensors (not parameters) autograd keeps for backward of ``module(x)``, by storage."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return saved, out


@pytest.mark.parametrize('frozen_base', [True, False])
def test_dropout_saves_one_byte_mask_and_one_input_sized_tensor(frozen_base):
    n, d, r, p = 64, 32, 4, 0.25
    layer = _frozen(_layer(d, d, rank=r, dropout=p).train(), frozen_base)
    x = torch.randn(n, d, requires_grad=True)
    torch.manual_seed(5)
    saved, _ = _saved_tensors(layer, x)
    torch.manual_seed(5)
    dropped, keep = _dropout(x.detach(), p)
    by_kind = {(t.dtype, tuple(t.shape)): t for t in saved.values()}
    # the mask (one byte per element), one fp32 input-sized tensor, the r-wide output
    assert sorted(by_kind, key=str) == sorted(
        [(torch.uint8, (n, d)), (torch.float32, (n, d)), (torch.float32, (n, r))], key=str)
    assert torch.equal(by_kind[(torch.uint8, (n, d))], keep)
    assert set(keep.unique().tolist()) == {0, 1}
    input_sized = by_kind[(torch.float32, (n, d))]
    if frozen_base:
        # the base keeps nothing input-sized: the dropped input replaces x
        assert input_sized.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert torch.equal(input_sized, x.detach() * keep)
        assert torch.equal(dropped, x.detach() * keep)
    else:
        # the base keeps x for its weight gradient: the adapter shares it
        assert input_sized.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    # an input that needs no gradient needs no mask (frozen base: only A's gradient is left)
    saved_no_grad, _ = _saved_tensors(layer, x.detach())
    dtypes = sorted(str(t.dtype) for t in saved_no_grad.values())
    expected = ['torch.float32'] * 2
    assert dtypes == (expected if frozen_base else expected + ['torch.uint8'])


@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_mask_statistics_and_dropped_values(p, dtype):
    # odd element count: the last int32 word of the random bits is left unused
    x = torch.randn(333, 301).to(dtype)
    dropped, keep = _dropout(x, p)
    assert keep.dtype == torch.uint8 and keep.shape == x.shape
    assert dropped.dtype == dtype and torch.equal(dropped, x * keep)
    dropped_t, keep_t = _dropout(x.t(), p)  # a non-contiguous input
    assert torch.equal(dropped_t, x.t() * keep_t)
    # both int32 halves of every 64-bit draw are uniform: even and odd positions alike
    flat = keep.flatten().double()
    std = math.sqrt(p * (1 - p) / (flat.numel() // 2))  # of a half's mean
    for part in (flat, flat[0::2], flat[1::2]):
        assert part.mean().item() == pytest.approx(1 - p, abs=5 * std)
    torch.manual_seed(4)
    a = _dropout(x, p)[1]
    torch.manual_seed(4)
    assert torch.equal(_dropout(x, p)[1], a)  # a function of torch's generator state
    assert not torch.equal(_dropout(x, p)[1], a)


def test_dropout_keeps_tensors_only_through_save_for_backward():
    # A tensor kept as a ctx attribute would bypass saved-tensor hooks, so activation
    # checkpointing would keep it alive instead of recomputing it.
    layer = _layer(16, 12, dropout=0.3).train()
    out = layer(torch.randn(4, 16, requires_grad=True))
    nodes, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            nodes.append(node)
            stack.extend(fn for fn, _ in node.next_functions)
    ctx = [n for n in nodes if type(n).__name__ == '_DropoutDownProjBackward']
    assert len(ctx) == 1
    assert not [k for k, v in vars(ctx[0]).items() if isinstance(v, torch.Tensor)]
    assert any(t.dtype == torch.uint8 for t in ctx[0].saved_tensors if t is not None)


@pytest.mark.parametrize('frozen_base', [True, False])
def test_autocast_bf16_with_dropout(frozen_base):
    layer = _frozen(_layer(16, 12, dropout=0.1).train(), frozen_base)
    x = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        saved, y = _saved_tensors(layer, x)
    assert y.dtype == torch.bfloat16
    # the dropped input is kept in the dtype its GEMM ran in, never as an extra fp32 copy
    assert torch.float32 not in {t.dtype for t in saved.values() if t.shape == x.shape}
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    # gradients equal the explicit formula under the same mask and the same autocast
    torch.manual_seed(2)
    keep = _dropout(x, 0.1)[1]
    ref = _frozen(_layer(16, 12, dropout=0.1), frozen_base)
    ref.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_ref = _formula(ref, x2, keep)
    y_ref.float().square().sum().backward()
    # bf16 rounding differs (fused addmm, where the 1/(1-p) scale is applied): about 1% of
    # the largest value; a wrong mask gives errors of the order of the largest value.
    for ours, theirs in [(y, y_ref), (layer.lora_A.grad, ref.lora_A.grad),
                         (layer.lora_B.grad, ref.lora_B.grad), (x.grad, x2.grad)]:
        error = (ours.float() - theirs.float()).abs().max()
        assert error <= 3e-2 * theirs.float().abs().max()


# ----------------------------------------------------------------- activation memory
def _saved_activation_bytes(module, x):
    """Bytes of distinct non-parameter storages autograd keeps for backward."""
    saved, out = _saved_tensors(module, x)
    return sum(t.untyped_storage().nbytes() for t in saved.values()), out


class _PeftStyle(nn.Module):
    """Dropout -> A -> B branch as PEFT writes it (reference for the memory test)."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.drop = layer, nn.Dropout(layer.dropout)

    def forward(self, x):
        base = F.linear(x, self.layer.weight, self.layer.bias)
        return base + self.layer.scaling * F.linear(
            F.linear(self.drop(x), self.layer.lora_A), self.layer.lora_B)


@pytest.mark.parametrize('frozen_base', [True, False])
def test_dropout_keeps_no_extra_copy_of_input(frozen_base):
    n, d, r = 256, 64, 4
    x = torch.randn(n, d, requires_grad=True)
    x_bytes = x.numel() * x.element_size()
    mask_bytes = x.numel()  # one byte per element
    low_rank_bytes = n * r * 4

    def make(p):
        return _frozen(_layer(d, d, rank=r, dropout=p).train(), frozen_base)

    plain = nn.Linear(d, d)
    plain.weight.requires_grad_(not frozen_base)
    base_bytes, _ = _saved_activation_bytes(plain, x)
    b0, _ = _saved_activation_bytes(make(0.0), x)
    b1, _ = _saved_activation_bytes(make(0.1), x)
    peft_bytes, _ = _saved_activation_bytes(_PeftStyle(make(0.1)), x)
    # dropout 0.1 costs what dropout 0 costs (one input-sized tensor, shared with the base
    # layer when it needs it, plus the r-wide intermediate) plus a one-byte mask; no copy.
    assert b1 == b0 + mask_bytes
    assert b0 <= max(base_bytes, x_bytes) + low_rank_bytes
    if not frozen_base:
        assert base_bytes == x_bytes and b1 - base_bytes <= low_rank_bytes + mask_bytes
    # the Dropout -> Linear formulation keeps at least one extra input-sized fp32 tensor
    assert peft_bytes >= b0 + x_bytes
    assert b1 <= 0.65 * peft_bytes


def _peft_model(d_in, d_out, r, alpha, dropout, use_rslora=False):
    peft = pytest.importorskip('peft')
    holder = nn.Module()
    holder.lin = nn.Linear(d_in, d_out)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=['lin'],
                          use_rslora=use_rslora)
    return peft.inject_adapter_in_model(cfg, holder)


def test_dropout_memory_against_peft_layer():
    n, d, r = 256, 64, 4
    theirs = _peft_model(d, d, r, 8, 0.1).lin.train()
    ours = LoRALinear.from_linear(nn.Linear(d, d), rank=r, alpha=8, dropout=0.1).train()
    for layer in (theirs.base_layer, ours):
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
    x = torch.randn(n, d, requires_grad=True)
    x_bytes, mask_bytes = x.numel() * x.element_size(), x.numel()
    theirs_bytes, _ = _saved_activation_bytes(theirs, x)
    ours_bytes, _ = _saved_activation_bytes(ours, x)
    assert ours_bytes == x_bytes + mask_bytes + n * r * 4
    assert theirs_bytes >= ours_bytes + x_bytes - mask_bytes
    assert ours_bytes <= 0.65 * theirs_bytes


@pytest.mark.parametrize('use_rslora', [False, True])
def test_equals_peft_lora_layer(use_rslora):
    d_in, d_out, r, alpha = 12, 20, 4, 6
    theirs = _peft_model(d_in, d_out, r, alpha, 0.0, use_rslora).lin
    ours = LoRALinear(d_in, d_out, rank=r, alpha=alpha, use_rslora=use_rslora)
    with torch.no_grad():
        theirs.lora_B['default'].weight.normal_()
        ours.weight.copy_(theirs.base_layer.weight)
        ours.bias.copy_(theirs.base_layer.bias)
        ours.lora_A.copy_(theirs.lora_A['default'].weight)
        ours.lora_B.copy_(theirs.lora_B['default'].weight)
    assert ours.scaling == pytest.approx(theirs.scaling['default'])
    x = torch.randn(3, 5, d_in, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ours, y_theirs = ours(x), theirs(x2)
    torch.testing.assert_close(y_ours, y_theirs)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    # fused addmm vs separate matmul + add: fp32 rounding differs slightly
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A['default'].weight.grad, **tol)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B['default'].weight.grad, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)


# ------------------------------------------------------------------------------- merge
def test_merge_unmerge_equivalence_and_restore():
    layer = _layer(32, 48)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 32)
    layer.eval()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    # merged forward is exactly a plain linear with the merged weight
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer.weight, w0 + layer.delta_weight())
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    assert (layer.weight - w0).abs().max().item() <= 1e-6
    layer.unmerge()  # idempotent
    assert (layer.weight - w0).abs().max().item() <= 1e-6


def test_merged_layer_costs_exactly_a_linear():
    n, d_in, d_out, r = 64, 32, 48, 4
    x = torch.randn(n, d_in)
    plain = nn.Linear(d_in, d_out)
    layer = LoRALinear.from_linear(plain, rank=r).eval()

    def flops(m):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x)
        return fc.get_total_flops()

    linear_flops = flops(plain)
    assert linear_flops == 2 * n * d_in * d_out
    assert flops(layer) == linear_flops + 2 * n * r * (d_in + d_out)
    layer.merge()
    assert flops(layer) == linear_flops


def test_training_a_merged_layer_is_refused():
    layer = _layer()
    layer.merge()
    x = torch.randn(2, 16)
    layer.train()
    with pytest.raises(RuntimeError, match='merged.*unmerge'):
        layer(x)
    with torch.no_grad():
        layer(x)  # inference in train mode is fine
    layer.eval()
    layer(x)
    layer.adapter_enabled = False
    with pytest.raises(RuntimeError, match='disabled on a merged layer'):
        layer(x)
    with pytest.raises(RuntimeError, match='unmerge'):
        layer.reset_lora_parameters()


def test_safe_merge_refuses_non_finite():
    layer = _layer()
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float('inf')
    with pytest.raises(RuntimeError, match='NaN/inf'):
        layer.merge(safe=True)
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_adapter_disabled_gives_base_output():
    layer = _layer()
    x = torch.randn(3, 16)
    layer.adapter_enabled = False
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.adapter_enabled = True
    assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))


# ------------------------------------------------------------------------------ slices
def test_qkv_slices_adapt_only_q_and_v():
    d, r = 8, 2
    base = nn.Linear(d, 3 * d)
    layer = LoRALinear.from_linear(base, rank=r, alpha=4,
                                   enable_slices=[True, False, True])
    assert layer.lora_A.shape == (2 * r, d) and layer.lora_B.shape == (2 * d, r)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, d)
    y, y0 = layer(x), base(x)
    # k slice: exactly zero change; q and v change
    assert torch.equal(y[..., d:2 * d], y0[..., d:2 * d])
    assert not torch.equal(y[..., :d], y0[..., :d])
    assert not torch.equal(y[..., 2 * d:], y0[..., 2 * d:])
    torch.testing.assert_close(y, _formula(layer, x), rtol=1e-5, atol=1e-5)
    delta = layer.delta_weight()
    assert torch.count_nonzero(delta[d:2 * d]) == 0
    # merge with slices: k rows of the weight bit-identical, outputs equal
    layer.eval()
    layer.merge()
    assert torch.equal(layer.weight[d:2 * d], base.weight[d:2 * d])
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert (layer.weight - base.weight).abs().max() <= 1e-6


def test_slices_gradients_only_reach_enabled_pairs():
    layer = LoRALinear(6, 12, rank=2, enable_slices=[False, True, False])
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 6)
    # loss only on the disabled slices: no gradient reaches the adapter
    layer(x)[..., :4].sum().backward()
    assert layer.lora_A.grad is None or torch.count_nonzero(layer.lora_A.grad) == 0
    assert layer.lora_B.grad is None or torch.count_nonzero(layer.lora_B.grad) == 0


@pytest.mark.parametrize('slices, msg', [
    ([True, True], 'not divisible'),
    ([False, False, False], 'adapts nothing'),
    ([1, 0, 1], 'sequence of bools'),
    ([], 'sequence of bools'),
])
def test_slice_errors(slices, msg):
    with pytest.raises(ValueError, match=msg):
        LoRALinear(4, 9, enable_slices=slices)


# -------------------------------------------------------------------------- state dict
def test_state_dict_keys_and_plain_checkpoint_loads():
    plain = nn.Linear(8, 6)
    layer = LoRALinear(8, 6, rank=2)
    assert list(layer.state_dict()) == ['weight', 'bias', 'lora_A', 'lora_B']
    assert list(LoRALinear(8, 6, bias=False).state_dict()) == ['weight', 'lora_A', 'lora_B']
    assert list(LoRALinear(8, 6, enable_slices=[True, False]).state_dict()) == [
        'weight', 'bias', 'lora_A', 'lora_B']
    res = layer.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ['lora_A', 'lora_B'] and not res.unexpected_keys
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.bias, plain.bias)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), plain(x))
    # a wrongly shaped base weight is still refused
    with pytest.raises(RuntimeError, match='size mismatch'):
        layer.load_state_dict(nn.Linear(8, 5).state_dict(), strict=False)


def test_from_linear_copies_and_follows_dtype():
    base = nn.Linear(8, 6).double().eval()
    base.weight.requires_grad_(False)
    layer = LoRALinear.from_linear(base, rank=2)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer.weight.data_ptr() != base.weight.data_ptr()
    assert torch.equal(layer.weight, base.weight) and torch.equal(layer.bias, base.bias)
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    assert not layer.training
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not torch.equal(layer.weight, base.weight)  # no shared storage
    bf = LoRALinear.from_linear(nn.Linear(4, 4, bias=False).to(torch.bfloat16))
    assert bf.bias is None and bf.lora_A.dtype == torch.bfloat16
    with pytest.raises(TypeError, match='never nested'):
        LoRALinear.from_linear(layer)
    with pytest.raises(TypeError, match='expects nn.Linear'):
        LoRALinear.from_linear(nn.Conv2d(2, 2, 1))


def test_registered_in_mmengine_models():
    from mmengine.registry import MODELS as ENGINE_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    for registry in (ENGINE_MODELS, SEG_MODELS):
        layer = registry.build(dict(type='LoRALinear', in_features=4, out_features=6, rank=2))
        assert isinstance(layer, LoRALinear) and isinstance(layer, nn.Linear)
        assert layer.lora_A.shape == (2, 4)


@pytest.mark.parametrize('kwargs, msg', [
    (dict(rank=0), 'rank must be a positive int'),
    (dict(rank=-2), 'rank must be a positive int'),
    (dict(rank=2.5), 'rank must be a positive int'),
    (dict(alpha=0), 'alpha must be a number > 0'),
    (dict(alpha=-1.0), 'alpha must be a number > 0'),
    (dict(dropout=1.0), r'dropout must be in \[0, 1\)'),
    (dict(dropout=-0.1), r'dropout must be in \[0, 1\)'),
    (dict(init_lora_a='xavier'), 'init_lora_a must be one of'),
])
def test_constructor_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        LoRALinear(4, 4, **kwargs)


def test_deepcopy_and_dropout_determinism_under_manual_seed():
    # EMA hooks and model averaging deep-copy models; dropout masks follow torch.manual_seed.
    layer = _layer(8, 8, dropout=0.2).train()
    clone = copy.deepcopy(layer)
    x = torch.randn(4, 8)
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    b = clone(x)
    assert torch.equal(a, b)
    c = clone(x)  # next draw: a different mask
    assert not torch.equal(b, c)


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_compiles_without_graph_breaks(dropout):
    # aot_eager traces forward and backward like inductor does, without code generation.
    layer = LoRALinear.from_linear(nn.Linear(16, 24), rank=4, dropout=dropout,
                                   enable_slices=[True, False, True]).train()
    layer.weight.requires_grad_(False)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    x = torch.randn(3, 16, requires_grad=True)
    compiled(x).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.weight.grad is None
    if dropout == 0.0:
        torch.testing.assert_close(compiled(x), layer(x))
