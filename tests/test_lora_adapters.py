"""Adapter files, named adapters, disabling, and the "no forgetting" guarantee."""
import json
import os

import pytest
import torch
import torch.nn as nn
from mmpretrain.models import VisionTransformer
from safetensors import safe_open

from eomt_mm.lora import (LoRALinear, add_adapter, apply_lora, disable_adapters,
                          load_adapter, merge_adapters, save_adapter, set_adapter,
                          snapshot_base)
from eomt_mm.lora.adapters import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME,
                                   AdapterMismatchError, active_adapter,
                                   adapter_state_keys, list_adapters, lora_layers)

TINY_ARCH = dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64)
LORA_CFG = dict(rank=4, lora_alpha=8, target_modules=['qkv', 'proj', 'fc1', 'fc2'])


class TinySeg(nn.Module):
    """A pretrained-style mmpretrain ViT backbone plus a new head with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.backbone = VisionTransformer(arch=TINY_ARCH, img_size=32, patch_size=8,
                                          out_type='featmap')
        self.head = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 3, 1))

    def forward(self, x):
        return self.head(self.backbone(x)[-1])


@pytest.fixture
def base_file(tmp_path):
    """The "pretrained" checkpoint: a plain state dict written with torch.save."""
    torch.manual_seed(1)
    model = TinySeg()
    with torch.no_grad():  # give BN statistics non-default values
        model.head[1].running_mean.normal_()
        model.head[1].running_var.uniform_(0.5, 2.0)
    path = str(tmp_path / 'base.pth')
    torch.save(model.state_dict(), path)
    return path


def load_base(path):
    model = TinySeg()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def lora_model(base_path, **overrides):
    model = load_base(base_path)
    apply_lora(model, dict(LORA_CFG, **overrides))
    return model.eval()


def perturb(model, seed):
    """Stand-in for training: random values in every adapter entry."""
    gen = torch.Generator().manual_seed(seed)
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in adapter_state_keys(model):
            t = live[key]
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
            else:
                t.add_(seed)


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


def test_save_writes_only_the_adapter(tmp_path, base_file):
    model = lora_model(base_file)
    perturb(model, 1)
    out = save_adapter(model, str(tmp_path / 'ad'), metadata=dict(task='demo'))
    files = sorted(os.listdir(out))
    assert files == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    with safe_open(os.path.join(out, ADAPTER_WEIGHTS_NAME), 'pt') as f:
        keys = set(f.keys())
        assert f.metadata() == {'format': 'eomt_mm.lora_adapter'}
        assert torch.equal(f.get_tensor('backbone.layers.1.ffn.layers.1.lora_B'),
                           model.backbone.layers[1].ffn.layers[1].lora_B)
    # LoRA matrices, backbone norms (trainable_norms default), the head and its BN
    # statistics; no frozen base weight.
    assert 'backbone.layers.0.attn.qkv.lora_A' in keys
    assert 'backbone.layers.0.ln1.weight' in keys and 'backbone.ln1.bias' in keys
    assert 'head.0.weight' in keys and 'head.1.running_var' in keys
    assert 'head.1.num_batches_tracked' in keys
    assert 'backbone.layers.0.attn.qkv.weight' not in keys
    assert 'backbone.patch_embed.projection.weight' not in keys
    assert 'backbone.pos_embed' not in keys
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & keys
    assert keys == set(adapter_state_keys(model))
    config = json.load(open(os.path.join(out, ADAPTER_CONFIG_NAME)))
    assert config['lora_config'] == model._lora_config
    assert config['metadata'] == {'task': 'demo'}
    qkv = config['layers']['backbone.layers.0.attn.qkv']
    assert (qkv['rank'], qkv['in_features'], qkv['out_features']) == (4, 32, 96)
    assert qkv['scaling'] == 2.0


def test_round_trip_restores_every_entry(tmp_path, base_file, x):
    trained = lora_model(base_file, qkv_enable=[True, False, True])
    perturb(trained, 1)
    save_adapter(trained, str(tmp_path / 'ad'))
    fresh = lora_model(base_file, qkv_enable=[True, False, True])
    assert not torch.equal(fresh(x), trained(x))
    load_adapter(fresh, str(tmp_path / 'ad'))
    ref, got = trained.state_dict(), fresh.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert torch.equal(fresh(x), trained(x))
    assert active_adapter(fresh) == 'default'


def test_swap_adapters_on_one_loaded_base(tmp_path, base_file, x):
    model_a = lora_model(base_file)
    perturb(model_a, 1)
    model_b = lora_model(base_file, lora_alpha=16)  # same rank, other scaling
    perturb(model_b, 2)
    save_adapter(model_a, str(tmp_path / 'a'))
    save_adapter(model_b, str(tmp_path / 'b'))
    ya, yb = model_a(x), model_b(x)
    assert not torch.allclose(ya, yb)

    model = lora_model(base_file)
    qkv = model.backbone.layers[0].attn.qkv
    weight_obj, weight_ptr = qkv.weight, qkv.weight.data_ptr()
    lora_obj = qkv.lora_A
    load_adapter(model, str(tmp_path / 'a'), 'a')
    load_adapter(model, str(tmp_path / 'b'), 'b')
    assert list_adapters(model) == ['a', 'b'] and active_adapter(model) == 'b'
    assert torch.equal(model(x), yb)
    assert qkv.scaling == 4.0 and qkv.alpha == 16.0
    set_adapter(model, 'a')
    assert torch.equal(model(x), ya)
    assert qkv.scaling == 2.0
    set_adapter(model, 'b')
    assert torch.equal(model(x), yb)
    # Same parameter objects and storage: nothing was rebuilt or reallocated, so an
    # optimizer / DDP holding them stays valid.
    assert qkv.weight is weight_obj and qkv.weight.data_ptr() == weight_ptr
    assert qkv.lora_A is lora_obj
    with pytest.raises(KeyError, match="no adapter named 'c'.*\\['a', 'b'\\]"):
        set_adapter(model, 'c')


def test_switching_keeps_each_adapters_training(tmp_path, base_file, x):
    a = lora_model(base_file)
    perturb(a, 1)
    save_adapter(a, str(tmp_path / 'a'))
    model = lora_model(base_file)
    load_adapter(model, str(tmp_path / 'a'), 'a')
    add_adapter(model, 'fresh')  # current values stored under a second name
    set_adapter(model, 'a')
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    trained = model(x)
    assert not torch.equal(trained, a(x))
    set_adapter(model, 'fresh')
    set_adapter(model, 'a')
    assert torch.equal(model(x), trained)


def test_rank_mismatch_names_key_and_shapes(tmp_path, base_file, x):
    small = lora_model(base_file)
    save_adapter(small, str(tmp_path / 'r4'))
    model = lora_model(base_file, rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(model, str(tmp_path / 'r4'))
    msg = str(err.value)
    assert "layer 'backbone.layers.0.attn.qkv': adapter rank 4 but model rank 8" in msg
    assert ("tensor 'backbone.layers.0.attn.qkv.lora_A': adapter shape [4, 32] but model "
            'shape [8, 32]') in msg
    # Nothing was changed by the failed load.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert list_adapters(model) == []


def test_target_mismatch_and_strictness(tmp_path, base_file):
    full = lora_model(base_file)
    save_adapter(full, str(tmp_path / 'full'))
    qkv_only = lora_model(base_file, target_modules=['qkv'])
    with pytest.raises(AdapterMismatchError,
                       match=r"'backbone.layers.0.attn.proj', which in this model is a "
                       r'Linear, not a LoRALinear'):
        load_adapter(qkv_only, str(tmp_path / 'full'))
    save_adapter(qkv_only, str(tmp_path / 'qkv'))
    # The other way round: the model has LoRA layers the adapter does not cover.
    with pytest.raises(AdapterMismatchError,
                       match=r"model LoRA layer 'backbone.layers.0.attn.proj' is not in "
                       'the adapter'):
        load_adapter(lora_model(base_file), str(tmp_path / 'qkv'))
    # Frozen norms in the model, trainable ones in the adapter: strict refuses,
    # strict=False copies them in.
    no_norms = lora_model(base_file, trainable_norms=False)
    with pytest.raises(AdapterMismatchError,
                       match=r"'backbone.layers.0.ln1.weight' is a frozen \(non-adapter\)"):
        load_adapter(no_norms, str(tmp_path / 'full'))
    load_adapter(no_norms, str(tmp_path / 'full'), strict=False)
    assert torch.equal(no_norms.backbone.layers[0].ln1.weight,
                       full.backbone.layers[0].ln1.weight)


def test_adapter_on_another_base_is_detected(tmp_path, base_file, x):
    trained = lora_model(base_file)
    perturb(trained, 1)
    save_adapter(trained, str(tmp_path / 'ad'))
    config = json.load(open(tmp_path / 'ad' / ADAPTER_CONFIG_NAME))
    assert 'backbone.layers.0.attn.qkv.weight' in config['base_fingerprints']
    assert 'backbone.layers.0.ln1.weight' not in config['base_fingerprints']  # trainable
    other = lora_model(base_file)
    with torch.no_grad():
        other.backbone.layers[1].ffn.layers[1].weight.mul_(1.001)
    with pytest.raises(AdapterMismatchError,
                       match=r"trained on another base: 1 frozen base tensor\(s\) differ.*"
                       r"backbone.layers.1.ffn.layers.1.weight"):
        load_adapter(other, str(tmp_path / 'ad'), check_base='error')
    load_adapter(other, str(tmp_path / 'ad'))  # default: a warning, then loads
    assert torch.equal(other.backbone.layers[0].attn.qkv.lora_B,
                       trained.backbone.layers[0].attn.qkv.lora_B)
    # The same base passes the check.
    load_adapter(lora_model(base_file), str(tmp_path / 'ad'), check_base='error')


def test_bad_adapter_paths(tmp_path, base_file):
    model = lora_model(base_file)
    with pytest.raises(FileNotFoundError, match='adapter_model.safetensors'):
        load_adapter(model, str(tmp_path))
    save_adapter(model, str(tmp_path / 'ad'))
    cfg_path = tmp_path / 'ad' / ADAPTER_CONFIG_NAME
    cfg = json.load(open(cfg_path))
    cfg['format'] = 'something-else'
    json.dump(cfg, open(cfg_path, 'w'))
    with pytest.raises(ValueError, match='not an eomt_mm adapter config'):
        load_adapter(model, str(tmp_path / 'ad'))
    with pytest.raises(ValueError, match='no LoRALinear'):
        save_adapter(load_base(base_file), str(tmp_path / 'none'))


def test_disable_adapters_gives_base_outputs_exactly(base_file, x):
    base = load_base(base_file)
    model = lora_model(base_file)
    snapshot_base(model)
    perturb(model, 3)  # LoRA, backbone norms and head all change
    adapted = model(x)
    expected_base = base.backbone(x)[-1]
    with disable_adapters(model) as m:
        assert m is model
        assert torch.equal(model.backbone(x)[-1], expected_base)
        assert all(not layer.adapter_enabled for layer in lora_layers(model).values())
        # The head is not part of the pretrained base: it keeps the adapter's values.
        assert torch.equal(model(x), model.head(expected_base))
    assert torch.equal(model(x), adapted)
    # Restored after an exception too.
    with pytest.raises(RuntimeError, match='boom'):
        with disable_adapters(model):
            raise RuntimeError('boom')
    assert torch.equal(model(x), adapted)


def test_disable_adapters_on_merged_layers(base_file, x):
    base = load_base(base_file)
    model = lora_model(base_file)
    snapshot_base(model)
    perturb(model, 3)
    adapted = model(x)
    merged = merge_adapters(model)
    assert len(merged) == 8
    merged_weights = {n: m.weight.clone() for n, m in lora_layers(model).items()}
    with disable_adapters(model):
        torch.testing.assert_close(model.backbone(x)[-1], base.backbone(x)[-1],
                                   atol=1e-5, rtol=0)
    for name, layer in lora_layers(model).items():
        assert layer.merged and layer.adapter_enabled
        assert torch.equal(layer.weight, merged_weights[name]), name
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)


def test_no_forgetting_after_training(base_file, x):
    """Train with LoRA: the frozen base stays bit-identical to the file it came from and
    the disabled model reproduces the base model exactly."""
    checkpoint = torch.load(base_file, weights_only=True)
    base = load_base(base_file)
    model = lora_model(base_file, lora_dropout=0.1)
    snapshot_base(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    target = torch.randn(2, 3, 4, 4)
    for _ in range(5):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
        opt.step()
    model.eval()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) > 10
    state = model.state_dict()
    for name in frozen:
        assert torch.equal(state[name], checkpoint[name]), name
    # Training did change the adapter (including the backbone norms).
    assert model.backbone.layers[0].attn.qkv.lora_B.abs().sum() > 0
    assert not torch.equal(state['backbone.layers.0.ln1.weight'],
                           checkpoint['backbone.layers.0.ln1.weight'])
    with disable_adapters(model):
        assert torch.equal(model.backbone(x)[-1], base.backbone(x)[-1])


def _vit_b_adapter_numel(rank: int) -> int:
    d, hidden, layers = 768, 3072, 12
    per_block = rank * ((d + 3 * d) + (d + d) + (d + hidden) + (hidden + d))
    norms = layers * 2 * 2 * d + 2 * d  # ln1, ln2 per block + final norm
    return layers * per_block + norms


def test_vit_b_rank8_adapter_is_a_few_mb(tmp_path):
    # The real mmpretrain ViT-B, built on the meta device (no init compute), injected,
    # then given zeroed CPU storage so the adapter file can be written and measured.
    with torch.device('meta'):
        vit = VisionTransformer(arch='b', img_size=224, patch_size=16)
    apply_lora(vit, dict(rank=8, lora_alpha=16, base_prefixes=['']))
    vit.to_empty(device='cpu')
    with torch.no_grad():
        for t in vit.state_dict(keep_vars=True).values():
            t.zero_()
    full_bytes = sum(t.numel() * t.element_size() for t in vit.state_dict().values())
    expected_numel = _vit_b_adapter_numel(8)
    assert expected_numel == 1_218_048
    assert sum(v.numel() for k, v in vit.state_dict().items()
               if k in adapter_state_keys(vit)) == expected_numel
    out = save_adapter(vit, str(tmp_path / 'vit_b'))
    size = os.path.getsize(os.path.join(out, ADAPTER_WEIGHTS_NAME))
    # fp32 tensors plus the safetensors header (names and offsets, a few kB).
    assert expected_numel * 4 < size < expected_numel * 4 + 64_000
    assert 4.8e6 < size < 5e6, size
    assert full_bytes > 340e6 and size < 0.015 * full_bytes


def test_lora_layers_have_expected_count(base_file):
    model = lora_model(base_file)
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values())
    assert len(lora_layers(model)) == 2 * 4
