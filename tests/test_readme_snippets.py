"""Every ```python snippet of README.md runs, on the demo model (configs/eomt_lora_demo.py).

The README's adapter example once called ``load_adapter(..., name='rba')`` (the parameter is
``adapter_name``) and switched to an adapter name it never loaded; these tests execute the
snippets as they are written, so such a mistake fails here.
"""
import copy
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS

from eomt_mm.lora import LoRAConfig, LoRALinear, save_adapter
from eomt_mm.lora.adapters import adapter_state_keys

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
DEMO_CONFIG = REPO / 'configs' / 'eomt_lora_demo.py'
_SNIPPET = re.compile(r'^```python\n(.*?)^```', re.MULTILINE | re.DOTALL)


def readme_snippets():
    """``(line number, code)`` of every ```python block of the README."""
    text = README.read_text()
    return [(text[:m.start()].count('\n') + 1, m.group(1)) for m in _SNIPPET.finditer(text)]


def _demo_model():
    cfg = Config.fromfile(str(DEMO_CONFIG))
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg.model).eval()


def _perturb(model, seed):
    """Stand-in for training: new values in every adapter entry (floating point)."""
    gen = torch.Generator().manual_seed(seed)
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in adapter_state_keys(model):
            if live[key].is_floating_point():
                live[key].add_(0.05 * torch.randn(live[key].shape, generator=gen))


def _logits(model, inputs):
    with torch.no_grad():
        mask_logits, class_logits = model.forward_logits(inputs)
    return torch.cat([mask_logits.flatten(), class_logits.flatten()])


def test_readme_has_the_api_snippets():
    codes = [code for _, code in readme_snippets()]
    assert any('lora_config' in code for code in codes)
    assert any('load_adapter(' in code for code in codes)


@pytest.mark.parametrize('line,code', readme_snippets(),
                         ids=[f'README.md:{line}' for line, _ in readme_snippets()])
def test_readme_snippet_runs(line, code, tmp_path, monkeypatch):
    # Relative paths in the snippets (work_dirs/...) land in a temporary folder.
    monkeypatch.chdir(tmp_path)
    model = _demo_model()
    _perturb(model, seed=1)  # "the trained model": what the snippet saves
    inputs = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    trained = _logits(model, inputs)
    # Another adapter on the same base, for snippets that load one from work_dirs/adapters.
    other = copy.deepcopy(model)
    _perturb(other, seed=3)
    save_adapter(other, str(tmp_path / 'work_dirs' / 'adapters' / 'rba'))
    namespace = dict(model=model, inputs=inputs)
    exec(compile(code, f'README.md:{line}', 'exec'), namespace)

    result = namespace.get('model')
    if isinstance(result, dict):
        # A config snippet: its lora_config must be a valid block, built into the demo model.
        assert 'lora_config' in result, f'README.md:{line}: a model dict without lora_config'
        lora = LoRAConfig.from_dict(result['lora_config'])
        cfg = Config.fromfile(str(DEMO_CONFIG))
        cfg.model.lora_config = lora.to_dict()
        with DefaultScope.overwrite_default_scope('mmseg'):
            built = MODELS.build(cfg.model)
        assert any(isinstance(m, LoRALinear) for m in built.modules())
        return
    assert result is model
    if "set_adapter(model, 'cityscapes')" in code:
        # The adapter example switched back to the adapter it saved first: the model
        # computes what the trained model computed (also after merge_lora).
        assert torch.allclose(_logits(model, inputs), trained, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(_logits(other, inputs), trained, atol=1e-3)
