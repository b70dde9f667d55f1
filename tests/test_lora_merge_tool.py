"""merge_lora() and tools/merge_lora.py on a tiny mmseg EncoderDecoder with LoRA."""
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

from eomt_mm.engine.hooks.lora_checkpoint_hook import strip_frozen_base
from eomt_mm.lora import LoRALinear, merge_lora, save_adapter
from eomt_mm.lora.adapters import adapter_state_keys, lora_layers

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'merge_lora.py')

CONFIG = '''
default_scope = 'mmseg'
custom_imports = dict(imports=['eomt_mm'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='WithLoRA',
    model=dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[0., 0., 0.],
                               std=[1., 1., 1.], size=(32, 32)),
        backbone=dict(
            type='mmpretrain.VisionTransformer',
            arch=dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64),
            img_size=32, patch_size=8, out_type='featmap',
            init_cfg=dict(type='Pretrained', checkpoint={base!r})),
        decode_head=dict(
            type='FCNHead', in_channels=32, channels=16, num_convs=1, concat_input=False,
            num_classes=3, norm_cfg=norm_cfg, align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0,
                             avg_non_ignore=True)),
        train_cfg=dict(), test_cfg=dict(mode='whole')),
    lora_config=dict(rank={rank}, lora_alpha=8, target_modules=['qkv', 'proj', 'fc1', 'fc2'],
                     qkv_enable=[True, False, True]))
'''


def _load_tool():
    spec = importlib.util.spec_from_file_location('merge_lora_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def write_config(tmp_path, base, rank=4, name='tiny_lora.py'):
    path = tmp_path / name
    path.write_text(CONFIG.format(base=str(base), rank=rank))
    return str(path)


def build(cfg_path, lora=True):
    cfg = Config.fromfile(cfg_path)
    init_default_scope('mmseg')
    model_cfg = cfg.model if lora else tool.without_lora(cfg.model)
    return MODELS.build(model_cfg)


@pytest.fixture
def setup(tmp_path):
    """(config path, base path, trained LoRA model, input)."""
    return trained_lora_model(tmp_path)


def trained_lora_model(tmp_path):
    """(config path, base path, LoRA model with trained-like adapters in eval mode, input)."""
    torch.manual_seed(3)
    base_path = tmp_path / 'base_backbone.pth'
    cfg_path = write_config(tmp_path, base_path)
    plain = build(cfg_path, lora=False)
    torch.save(plain.backbone.state_dict(), str(base_path))
    model = build(cfg_path)
    model.init_weights()
    gen = torch.Generator().manual_seed(5)
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():  # stand-in for training
        for key in adapter_state_keys(model):
            if live[key].is_floating_point():
                live[key].add_(0.2 * torch.randn(live[key].shape, generator=gen))
    model.eval()
    return cfg_path, str(base_path), model, torch.randn(2, 3, 32, 32)


def plain_outputs(cfg_path, merged_file, x):
    ckpt = torch.load(merged_file, weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    assert all(isinstance(v, torch.Tensor) for v in ckpt['state_dict'].values())
    plain = build(cfg_path, lora=False)
    plain.load_state_dict(ckpt['state_dict'], strict=True)
    plain.eval()
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    with torch.no_grad():
        return plain(x, mode='tensor'), ckpt['meta']


def test_merge_lora_replaces_layers(setup):
    cfg_path, _, model, x = setup
    with torch.no_grad():
        ref = model(x, mode='tensor')
    merge_lora(model)
    assert not lora_layers(model)
    assert type(model.backbone.layers[0].attn.qkv) is torch.nn.Linear
    assert not hasattr(model, '_lora_config')
    with torch.no_grad():
        torch.testing.assert_close(model(x, mode='tensor'), ref, atol=1e-5, rtol=0)
    plain = build(cfg_path, lora=False)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x, mode='tensor'), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='no LoRALinear'):
        merge_lora(model)


@pytest.mark.slow  # a subprocess: imports the whole stack again
def test_tool_cli_on_mmengine_checkpoint(setup, tmp_path):
    cfg_path, _, model, x = setup
    with torch.no_grad():
        ref = model(x, mode='tensor')
    ckpt = str(tmp_path / 'iter_10.pth')
    torch.save(dict(meta=dict(iter=10), state_dict=model.state_dict()), ckpt)
    out = str(tmp_path / 'merged.pth')
    proc = subprocess.run([sys.executable, TOOL, cfg_path, ckpt, out], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'merged 8 LoRA layers from mmengine checkpoint' in proc.stdout
    got, meta = plain_outputs(cfg_path, out, x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert meta['merged_lora_layers'] == 8 and meta['source_kind'] == 'mmengine checkpoint'
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.merged.pth')]


def test_tool_on_adapter_folder_and_adapter_only_checkpoint(setup, tmp_path):
    cfg_path, _, model, x = setup
    with torch.no_grad():
        ref = model(x, mode='tensor')
    adapter = save_adapter(model, str(tmp_path / 'adapter'))
    out = str(tmp_path / 'from_adapter.pth')
    assert tool.main([cfg_path, adapter, out]) == 0
    got, meta = plain_outputs(cfg_path, out, x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert meta['source_kind'] == 'adapter'

    ckpt = dict(meta=dict(iter=4), state_dict=model.state_dict())
    dropped = strip_frozen_base(model, ckpt)
    assert 'backbone.layers.0.attn.qkv.weight' in dropped
    path = str(tmp_path / 'adapter_only.pth')
    torch.save(ckpt, path)
    out2 = str(tmp_path / 'from_adapter_only.pth')
    assert tool.main([cfg_path, path, out2]) == 0
    got2, meta2 = plain_outputs(cfg_path, out2, x)
    torch.testing.assert_close(got2, ref, atol=1e-5, rtol=0)
    assert meta2['source_kind'] == 'adapter-only mmengine checkpoint'


def test_tool_refuses_adapter_only_checkpoint_on_other_base(setup, tmp_path, capsys):
    cfg_path, base_path, model, _ = setup
    ckpt = dict(meta=dict(iter=4), state_dict=model.state_dict())
    strip_frozen_base(model, ckpt)
    path = str(tmp_path / 'adapter_only.pth')
    torch.save(ckpt, path)
    other = {k: v + 0.01 for k, v in torch.load(base_path, weights_only=True).items()}
    other_path = str(tmp_path / 'other_base.pth')
    torch.save(other, other_path)
    other_cfg = write_config(tmp_path, other_path, name='other.py')
    assert tool.main([other_cfg, path, str(tmp_path / 'o.pth')]) == 1
    err = capsys.readouterr().err
    assert 'not the one this checkpoint was trained on' in err
    assert 'backbone.' in err and 'values differ' in err
    # An adapter folder on the other base is refused as well.
    adapter = save_adapter(model, str(tmp_path / 'adapter'))
    assert tool.main([other_cfg, adapter, str(tmp_path / 'o.pth')]) == 1
    assert 'trained on another base' in capsys.readouterr().err
    assert not osp.exists(tmp_path / 'o.pth')


def test_tool_refuses_misfit_and_keeps_existing_out(setup, tmp_path, capsys):
    cfg_path, base_path, model, _ = setup
    out = tmp_path / 'merged.pth'
    out.write_bytes(b'previous good file')
    # A checkpoint trained with rank 8 against a rank-4 config.
    cfg8 = write_config(tmp_path, base_path, rank=8, name='r8.py')
    m8 = build(cfg8)
    ckpt = str(tmp_path / 'r8.pth')
    torch.save(dict(meta={}, state_dict=m8.state_dict()), ckpt)
    assert tool.main([cfg_path, ckpt, str(out)]) == 1
    err = capsys.readouterr().err
    assert 'does not fit the model built from the config' in err
    assert ('backbone.layers.0.attn.qkv.lora_A: checkpoint [16, 32] vs model [8, 32]'
            in err)
    assert out.read_bytes() == b'previous good file'
    # Missing keys are named too.
    sd = model.state_dict()
    del sd['decode_head.conv_seg.weight']
    torch.save(dict(meta={}, state_dict=sd), ckpt)
    assert tool.main([cfg_path, ckpt, str(out)]) == 1
    assert "missing keys (1): ['decode_head.conv_seg.weight']" in capsys.readouterr().err
    assert out.read_bytes() == b'previous good file'


class NotATensor:
    """Pickled by reference: weights-only loading must refuse it."""


def test_tool_refuses_arbitrary_pickles(setup, tmp_path, capsys):
    cfg_path, _, model, _ = setup
    ckpt = str(tmp_path / 'evil.pth')
    torch.save(dict(meta=dict(x=NotATensor()), state_dict=model.state_dict()), ckpt)
    assert tool.main([cfg_path, ckpt, str(tmp_path / 'o.pth')]) == 1
    err = capsys.readouterr().err
    assert 'NotATensor' in err
    assert not osp.exists(tmp_path / 'o.pth')


def test_tool_refuses_config_without_lora(setup, tmp_path, capsys):
    cfg_path, _, model, _ = setup
    # The same model with its lora_config switched off.
    no_lora = tmp_path / 'no_lora.py'
    no_lora.write_text(open(cfg_path).read() + '\nmodel.update(lora_config=None)\n')
    ckpt = str(tmp_path / 'c.pth')
    torch.save(dict(meta={}, state_dict=model.state_dict()), ckpt)
    assert tool.main([str(no_lora), ckpt, str(tmp_path / 'o.pth')]) == 1
    assert 'has no LoRALinear layer' in capsys.readouterr().err
