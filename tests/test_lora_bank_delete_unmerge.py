"""delete_adapter and unmerge_adapters: behaviour and values."""
import pytest
import torch
from torch import nn

from eomt_mm.lora import add_adapter, apply_lora, merge_adapters, set_adapter, unmerge_adapters
from eomt_mm.lora.adapters import (active_adapter, adapter_state_keys, delete_adapter,
                                   list_adapters, lora_layers)

LORA_CFG = dict(rank=4, lora_alpha=8, target_modules=['qkv', 'proj', 'fc1', 'fc2'],
                base_prefixes=['backbone'])


class _Block(nn.Module):

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(3 * d, d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, 2 * d)
        self.mlp.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn.proj(self.attn.qkv(self.norm(x)))
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class _Tiny(nn.Module):
    """A two-block "pretrained" backbone and a new head."""

    def __init__(self, d=8):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.Sequential(_Block(d), _Block(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.backbone.blocks(x))


def _adapted(seed=0):
    torch.manual_seed(seed)
    model = apply_lora(_Tiny(), dict(LORA_CFG))
    return model.eval()


def _randomise_adapter(model, seed):
    """Stand-in for training: a random change of every adapter entry (lora_B included)."""
    gen = torch.Generator().manual_seed(seed)
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in adapter_state_keys(model):
            live[key].add_(0.3 * torch.randn(live[key].shape, generator=gen))


def _adapter_values(model):
    live = model.state_dict()
    return {k: live[k].clone() for k in adapter_state_keys(model)}


# ---------------------------------------------------------------------- delete_adapter
def test_delete_active_adapter_forgets_it_and_keeps_live_values():
    model = _adapted()
    x = torch.randn(5, 8)
    _randomise_adapter(model, 1)
    add_adapter(model, 'a')
    values_a = _adapter_values(model)
    _randomise_adapter(model, 2)
    add_adapter(model, 'b')
    values_b = _adapter_values(model)
    out_b = model(x)
    assert list_adapters(model) == ['a', 'b'] and active_adapter(model) == 'b'

    delete_adapter(model, 'b')
    assert list_adapters(model) == ['a']
    assert active_adapter(model) is None
    # The live parameters are untouched: still b's values, same outputs.
    for key, value in _adapter_values(model).items():
        assert torch.equal(value, values_b[key]), key
    assert torch.equal(model(x), out_b)
    with pytest.raises(KeyError, match=r"no adapter named 'b'.*\['a'\]"):
        set_adapter(model, 'b')

    # Switching away from "no active adapter" does not resurrect the deleted name.
    set_adapter(model, 'a')
    assert list_adapters(model) == ['a'] and active_adapter(model) == 'a'
    for key, value in _adapter_values(model).items():
        assert torch.equal(value, values_a[key]), key


def test_delete_inactive_adapter_keeps_the_active_one():
    model = _adapted()
    _randomise_adapter(model, 1)
    add_adapter(model, 'a')
    _randomise_adapter(model, 2)
    add_adapter(model, 'b')
    before = _adapter_values(model)
    delete_adapter(model, 'a')
    assert list_adapters(model) == ['b'] and active_adapter(model) == 'b'
    for key, value in _adapter_values(model).items():
        assert torch.equal(value, before[key]), key


def test_delete_unknown_adapter_is_a_key_error_naming_the_loaded_ones():
    model = _adapted()
    with pytest.raises(KeyError, match=r"no adapter named 'x'.*loaded: \[\]"):
        delete_adapter(model, 'x')  # no bank at all yet
    add_adapter(model, 'b')
    add_adapter(model, 'a')
    with pytest.raises(KeyError, match=r"no adapter named 'x'.*loaded: \['a', 'b'\]"):
        delete_adapter(model, 'x')
    assert list_adapters(model) == ['a', 'b'] and active_adapter(model) == 'a'


# -------------------------------------------------------------------- unmerge_adapters
def test_unmerge_restores_weights_and_outputs():
    model = _adapted()
    _randomise_adapter(model, 3)  # non-zero lora_B: merging changes the weights
    x = torch.randn(5, 8)
    unmerged_out = model(x)
    layers = lora_layers(model)
    base_weights = {n: m.weight.detach().clone() for n, m in layers.items()}

    merged = merge_adapters(model)
    assert merged == list(layers)  # every enabled layer, in model order
    for name, layer in layers.items():
        assert layer.merged
        assert not torch.allclose(layer.weight, base_weights[name]), name

    assert unmerge_adapters(model) == merged
    eps = torch.finfo(torch.float32).eps
    for name, layer in layers.items():
        assert not layer.merged
        w0 = base_weights[name]
        delta = layer.delta_weight().detach()
        # W0 + delta - delta: off by at most a few roundings of the larger magnitude.
        bound = 4 * eps * (w0.abs() + delta.abs()).max()
        assert (layer.weight.detach() - w0).abs().max() <= bound, name
    torch.testing.assert_close(model(x), unmerged_out, rtol=1e-5, atol=1e-5)
    assert unmerge_adapters(model) == []  # nothing merged any more


def test_unmerge_only_touches_merged_layers():
    model = _adapted()
    _randomise_adapter(model, 4)
    layers = lora_layers(model)
    disabled = 'backbone.blocks.0.mlp.fc1'
    layers[disabled].adapter_enabled = False
    weight_before = layers[disabled].weight.detach().clone()
    merged = merge_adapters(model)
    assert disabled not in merged and len(merged) == len(layers) - 1
    assert unmerge_adapters(model) == merged
    # The disabled layer was never merged: its weight is bit-identical.
    assert torch.equal(layers[disabled].weight, weight_before)
    assert not any(layer.merged for layer in layers.values())
