"""A checkpoint or adapter trained with other LoRA settings than the config is refused by
tools/merge_lora.py and tools/test.py (it used to be merged / evaluated with the config's
``lora_alpha`` / ``use_rslora``: exit 0 and wrong weights), naming both values, the
``--cfg-options`` that rebuild the model as trained, and ``--lora-from-config``."""
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger

from _demo_tools_common import DEMO_CONFIG, load_tool
from eomt_mm.engine.hooks import LoRAConfigCheckHook
from eomt_mm.engine.lora_record import (LoRAConfigMismatchError, lora_config_from_cfg_text,
                                        lora_config_mismatches)
from eomt_mm.lora import save_adapter
from test_lora_merge_tool import build, plain_outputs, tool, trained_lora_model


@pytest.fixture
def trained(tmp_path):
    """(config, trained model with lora_alpha=8, input, reference output, checkpoint)."""
    cfg_path, _, model, x = trained_lora_model(tmp_path)
    with torch.no_grad():
        ref = model(x, mode='tensor')
    # What mmengine's Runner.save_checkpoint writes: the training config's text in meta.
    ckpt = tmp_path / 'iter_10.pth'
    torch.save(dict(meta=dict(iter=10, cfg=Config.fromfile(cfg_path).pretty_text),
                    state_dict=model.state_dict()), str(ckpt))
    return SimpleNamespace(cfg=cfg_path, model=model, x=x, ref=ref, ckpt=str(ckpt))


@pytest.mark.parametrize('option,key,trained_value,config_value', [
    ('model.lora_config.lora_alpha=16', 'lora_alpha', 8, 16),
    ('model.lora_config.use_rslora=True', 'use_rslora', False, True),
])
def test_merge_refuses_checkpoint_trained_with_other_scaling(trained, tmp_path, capsys,
                                                             option, key, trained_value,
                                                             config_value):
    out = tmp_path / 'merged.pth'
    out.write_bytes(b'previous merge')
    assert tool.main([trained.cfg, trained.ckpt, str(out), '--cfg-options', option]) == 1
    err = capsys.readouterr().err
    assert (f'lora_config.{key}: trained with {trained_value!r}, the config says '
            f'{config_value!r}') in err
    assert f'--cfg-options model.lora_config.{key}={trained_value}' in err
    assert '--lora-from-config' in err
    assert out.read_bytes() == b'previous merge'  # nothing written is lost
    # The suggested option gives the right merge ...
    fixed = tool.main([trained.cfg, trained.ckpt, str(out), '--cfg-options', option,
                       f'model.lora_config.{key}={trained_value}'])
    assert fixed == 0
    got, _ = plain_outputs(trained.cfg, str(out), trained.x)
    torch.testing.assert_close(got, trained.ref, atol=1e-5, rtol=0)
    # ... and --lora-from-config does what the config says (another function).
    assert tool.main([trained.cfg, trained.ckpt, str(out), '--cfg-options', option,
                      '--lora-from-config']) == 0
    got, _ = plain_outputs(trained.cfg, str(out), trained.x)
    assert (got - trained.ref).abs().max() > 1e-3


def test_merge_refuses_adapter_trained_with_other_alpha(trained, tmp_path, capsys):
    adapter = save_adapter(trained.model, str(tmp_path / 'adapter'))
    out = str(tmp_path / 'merged.pth')
    alpha16 = ['--cfg-options', 'model.lora_config.lora_alpha=16']
    assert tool.main([trained.cfg, adapter, out, *alpha16]) == 1
    assert 'lora_config.lora_alpha: trained with 8, the config says 16' in \
        capsys.readouterr().err
    assert not osp.exists(out)
    # With the flag the config's alpha is used, not the adapter's.
    assert tool.main([trained.cfg, adapter, out, *alpha16, '--lora-from-config']) == 0
    got, _ = plain_outputs(trained.cfg, out, trained.x)
    cfg16 = tmp_path / 'alpha16.py'
    cfg16.write_text(open(trained.cfg).read().replace('lora_alpha=8', 'lora_alpha=16'))
    model16 = build(str(cfg16))
    model16.load_state_dict(trained.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(got, model16.eval()(trained.x, mode='tensor'),
                                   atol=1e-5, rtol=0)


def test_cfg_text_is_read_without_executing_it(tmp_path):
    marker = tmp_path / 'executed'
    text = (f'import pathlib\npathlib.Path({str(marker)!r}).write_text("x")\n'
            "model = dict(type='EoMT', backbone=dict(type=print('side effect')),\n"
            '             lora_config=dict(rank=4, lora_alpha=-8.5,\n'
            '                              qkv_enable=[True, False, True]))\n')
    assert lora_config_from_cfg_text(text) == (
        True, dict(rank=4, lora_alpha=-8.5, qkv_enable=[True, False, True]))
    assert not marker.exists()
    # A lora_config that is not a plain literal is reported unreadable, never evaluated.
    assert lora_config_from_cfg_text("model = dict(lora_config=dict(rank=__import__('os')))") \
        == (False, None)
    assert lora_config_from_cfg_text('model = dict(type="X")') == (True, None)
    # Dropout does not change inference; what is compared fills in the defaults.
    assert lora_config_mismatches(dict(rank=8, lora_dropout=0.1), dict(rank=8)) == []
    assert lora_config_mismatches(dict(rank=8), None) == [('enabled', True, False)]


def test_test_tool_adds_the_check_and_the_hook_refuses(trained):
    test_tool = load_tool('test')
    args = test_tool.parse_args([str(DEMO_CONFIG), trained.ckpt])
    hooks = test_tool.build_cfg(args).custom_hooks
    assert [h for h in hooks if h['type'] == 'LoRAConfigCheckHook']
    args = test_tool.parse_args([str(DEMO_CONFIG), trained.ckpt, '--lora-from-config'])
    assert not [h for h in test_tool.build_cfg(args).custom_hooks
                if h['type'] == 'LoRAConfigCheckHook']

    runner = SimpleNamespace(model=trained.model, cfg=Config(dict(load_from=trained.ckpt)),
                             logger=MMLogger.get_current_instance())
    checkpoint = torch.load(trained.ckpt, weights_only=True)
    hook = LoRAConfigCheckHook()
    hook.after_load_checkpoint(runner, checkpoint)  # same settings: accepted
    trained.model._lora_config = dict(trained.model._lora_config, lora_alpha=32.0)
    with pytest.raises(LoRAConfigMismatchError,
                       match=r'lora_alpha: trained with 8, the config says 32\.0'):
        hook.after_load_checkpoint(runner, checkpoint)
