"""The faster formulations of standard layers equal the layers they replace.

``ScaleBlock.transposed_conv`` computes ``nn.ConvTranspose2d(k=2, s=2)`` as a GEMM and a pixel
shuffle; ``split_heads`` packs the per-head queries, keys and values. Both must give the values
(and, for training, the gradients) of the plain PyTorch formulation.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from eomt_mm.models.decode_heads.eomt_decoder import ScaleBlock
from eomt_mm.models.utils.attention import check_attn_mask, split_heads


def _block(dims: int, seed: int) -> ScaleBlock:
    torch.manual_seed(seed)
    block = ScaleBlock(dims)
    with torch.no_grad():  # non-trivial bias and norm, so that a dropped term shows
        block.conv1.bias.normal_()
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    return block


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('batch,height,width', [(1, 3, 5), (2, 4, 4)])
def test_transposed_conv_equals_conv_transpose2d(channels_last, batch, height, width):
    block = _block(24, seed=batch + height)
    x = torch.randn(batch, 24, height, width, requires_grad=True)
    x_in = x.to(memory_format=torch.channels_last) if channels_last else x
    ours = block.transposed_conv(x_in)
    ref = block.conv1(x)
    assert ours.shape == ref.shape == (batch, 24, 2 * height, 2 * width)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # Gradients: the same for the input, the weight and the bias.
    grad_out = torch.randn_like(ref)
    ours_grads = torch.autograd.grad(ours, (x, block.conv1.weight, block.conv1.bias), grad_out)
    ref_grads = torch.autograd.grad(ref, (x, block.conv1.weight, block.conv1.bias), grad_out)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_scale_block_equals_its_layers_in_sequence():
    block = _block(16, seed=0).eval()
    x = torch.randn(2, 16, 3, 4)
    ref = block.conv1(x)
    ref = block.conv2(F.gelu(ref))
    ref = F.layer_norm(ref.permute(0, 2, 3, 1), (16, ), block.norm.weight, block.norm.bias,
                       1e-6).permute(0, 3, 1, 2)
    with torch.no_grad():  # the in-place activation
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)  # the recorded one
    block.act = torch.nn.GELU(approximate='tanh')  # the configured activation is the one used
    with torch.no_grad():
        tanh_out = block(x)
    assert not torch.allclose(tanh_out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(tanh_out, block(x), atol=1e-6, rtol=1e-6)
    # Same parameters and state-dict keys as a checkpoint of the reference layout.
    assert sorted(block.state_dict()) == ['conv1.bias', 'conv1.weight', 'conv2.weight',
                                          'norm.bias', 'norm.weight']


def test_split_heads_packs_the_reference_views():
    qkv = torch.randn(2, 7, 3 * 4 * 5)
    q, k, v = split_heads(qkv, num_heads=4)
    ref = qkv.reshape(2, 7, 3, 4, 5).permute(2, 0, 3, 1, 4)
    for got, want in zip((q, k, v), ref):
        assert got.is_contiguous() and got.shape == (2, 4, 7, 5)
        assert torch.equal(got, want)
    q, k, v = split_heads(qkv, num_heads=4, pack=(False, False, True))
    assert not q.is_contiguous() and not k.is_contiguous() and v.is_contiguous()
    assert torch.equal(q, ref[0]) and torch.equal(v, ref[2])
    with pytest.raises(ValueError, match='does not split into 3 x 7 heads'):
        split_heads(qkv, num_heads=7)


def test_check_attn_mask_names_the_problem():
    check_attn_mask(None, 2, 4, 9)
    check_attn_mask(torch.ones(1, 4, 9, 9, dtype=torch.bool), 2, 4, 9)
    check_attn_mask(torch.ones(2, 1, 9, 9, dtype=torch.bool), 2, 4, 9)
    with pytest.raises(TypeError, match='must be a bool tensor'):
        check_attn_mask(torch.ones(2, 4, 9, 9), 2, 4, 9)
    with pytest.raises(ValueError, match=r'must have shape \[2 or 1, 4 or 1, 9, 9\]'):
        check_attn_mask(torch.ones(3, 4, 9, 9, dtype=torch.bool), 2, 4, 9)


def test_op_profile_attributes_time_to_the_operators_run():
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools',
                         'benchmark')
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from op_profile import format_profile, op_profile
    weight = torch.randn(64, 64)
    rows = op_profile({'matmul': lambda x: x @ weight, 'add': lambda x: x + 1.0},
                      torch.randn(32, 64), calls=3)
    matmul_ops = {op for op, _ in rows['matmul']}
    assert {'aten::mm'} <= matmul_ops or {'aten::matmul'} <= matmul_ops
    assert 'aten::add' in {op for op, _ in rows['add']}
    assert all(count > 0 for _, count in rows['add'].values())
    text = format_profile(rows, ['matmul', 'add'], top=1)
    lines = text.splitlines()
    assert lines[0].startswith('| operator') and 'matmul: self CPU ms / call' in lines[0]
    assert lines[-1].startswith('| total') and any('(other)' in line for line in lines)
    with pytest.raises(ValueError, match='calls must be >= 1'):
        op_profile({'add': lambda x: x + 1.0}, torch.randn(2), calls=0)
