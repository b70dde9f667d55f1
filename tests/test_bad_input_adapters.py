"""Broken adapter files: an empty or truncated ``adapter_model.safetensors`` names the file
(it used to raise a bare ``SafetensorError``), an adapter with NaN / inf values is refused
naming the tensor (it used to load and make every output NaN). The model and the files are
left as they were."""
import os

import pytest
import torch
from mmpretrain.models import VisionTransformer
from safetensors.torch import load_file, save_file

from eomt_mm.lora import apply_lora, load_adapter, save_adapter
from eomt_mm.lora.adapters import ADAPTER_WEIGHTS_NAME, adapter_state_keys

LORA_CFG = dict(rank=2, lora_alpha=4, target_modules=['qkv', 'fc2'])


def _model():
    torch.manual_seed(3)
    backbone = VisionTransformer(arch=dict(embed_dims=16, num_layers=1, num_heads=2,
                                           feedforward_channels=32),
                                 img_size=16, patch_size=8, out_type='featmap')
    model = torch.nn.Module()
    model.backbone = backbone
    return apply_lora(model, LORA_CFG).eval()


def _saved_adapter(tmp_path):
    model = _model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('lora_B'):
                param.normal_()
    folder = tmp_path / 'adapter'
    save_adapter(model, str(folder))
    return folder


def _live_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('damage', ['empty', 'truncated'])
def test_unreadable_adapter_weights_name_the_file(tmp_path, damage):
    folder = _saved_adapter(tmp_path)
    weights = folder / ADAPTER_WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(b'' if damage == 'empty' else data[:len(data) // 2])
    model = _model()
    before = _live_state(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, str(folder))
    message = str(info.value)
    assert str(weights) in message
    assert 'not a readable safetensors file' in message and 'truncated' in message
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize('bad_value', [float('nan'), float('inf')])
def test_non_finite_adapter_tensor_is_refused_naming_it(tmp_path, bad_value):
    folder = _saved_adapter(tmp_path)
    weights = folder / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(weights))
    key = 'backbone.layers.0.attn.qkv.lora_A'
    assert key in tensors
    tensors[key][0, 1] = bad_value
    save_file(tensors, str(weights))
    written = weights.read_bytes()
    model = _model()
    before = _live_state(model)
    with pytest.raises(ValueError, match=rf"tensor '{key}' \[2, 16\] holds 1 non-finite"):
        load_adapter(model, str(folder))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    # The file is left as it is (nothing written is lost).
    assert weights.read_bytes() == written


def test_intact_adapter_still_loads(tmp_path):
    folder = _saved_adapter(tmp_path)
    model = _model()
    load_adapter(model, str(folder))
    saved = load_file(str(folder / ADAPTER_WEIGHTS_NAME))
    live = model.state_dict()
    assert set(saved) == set(adapter_state_keys(model))
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    assert os.path.getsize(folder / ADAPTER_WEIGHTS_NAME) > 0
