"""The matching dialects of eomt_mm.lora.matching, and the config validating once."""
import ast
import os.path as osp

import pytest
from torch import nn

import eomt_mm.lora.config as config_module
from eomt_mm.lora import LoRAConfig, apply_lora, freeze_base_model, inject_lora
from eomt_mm.lora.matching import (DEFAULT_TARGETS, abbreviate_names, check_prefixes,
                                   check_trainable_pattern, first_matching_pattern,
                                   match_trainable, resolve_layers, under_prefixes)


def test_under_prefixes_is_on_component_boundaries():
    assert under_prefixes('backbone', ['backbone'])
    assert under_prefixes('backbone.layers.0.attn.qkv', ['backbone'])
    assert not under_prefixes('backbone2.layers.0', ['backbone'])
    assert not under_prefixes('decode_head.q', ['backbone'])
    assert under_prefixes('decode_head.q', ['backbone', 'decode_head'])
    assert under_prefixes('anything.at.all', [''])
    assert not under_prefixes('backbone', [])


def test_match_trainable_is_exact_or_full_regex():
    assert match_trainable('backbone.pos_embed', 'backbone.pos_embed')
    assert not match_trainable('backbone.pos_embed', 'pos_embed')  # no suffix rule
    assert not match_trainable('backbone.pos_embed2', 'backbone.pos_embed')
    assert match_trainable('backbone.layers.11', r'backbone\.layers\.(10|11)')
    assert not match_trainable('backbone.layers.11.ln1', r'backbone\.layers\.(10|11)')
    with pytest.raises(ValueError, match='neither an exact name nor a valid regular'):
        check_trainable_pattern('backbone.(x')
    with pytest.raises(ValueError, match='non-empty strings'):
        check_trainable_pattern('')


def test_check_prefixes_names_the_children():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(2, 2))
    check_prefixes(model, ['', 'backbone', 'backbone.0'])
    with pytest.raises(ValueError, match=r"base prefix 'encoder' is not a submodule of "
                       r"Module \(top-level children: \['backbone'\]\)"):
        check_prefixes(model, ['backbone', 'encoder'])


def test_layers_overrides_and_listing_helpers():
    assert resolve_layers({'last': 2}, 5, 'blocks') == {3, 4}
    assert resolve_layers([-1, 0], 5, 'blocks') == {0, 4}
    assert first_matching_pattern('blocks.2.attn.qkv', {'fc1': 1, 'qkv': 2, 'attn.qkv': 3}) \
        == 'qkv'
    assert first_matching_pattern('blocks.2.mlp.fc2', {'qkv': 2}) is None
    names = [f'blocks.{i}.attn.qkv' for i in range(3)] + ['head']
    assert abbreviate_names(names) == 'blocks.*.attn.qkv (x3), head'
    assert abbreviate_names([]) == '(none)'
    assert DEFAULT_TARGETS == ('qkv', 'proj', 'fc1', 'fc2')
    assert LoRAConfig().target_modules == list(DEFAULT_TARGETS)


class _Model(nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.attn = nn.Module()
            block.attn.qkv = nn.Linear(4, 12)
            block.norm = nn.LayerNorm(4)
            self.backbone.blocks.append(block)
        self.head = nn.Linear(4, 2)


def _count_validations(monkeypatch):
    calls = []
    original = LoRAConfig.__post_init__

    def counting(self):
        calls.append(1)
        original(self)

    monkeypatch.setattr(LoRAConfig, '__post_init__', counting)
    return calls


def test_apply_lora_validates_the_config_once(monkeypatch):
    calls = _count_validations(monkeypatch)
    model = apply_lora(_Model(), dict(target_modules=['qkv']))
    assert len(calls) == 1
    # Per block: lora_A, lora_B and the norm's weight and bias train; qkv's own do not.
    assert sum(p.requires_grad for p in model.backbone.parameters()) == 2 * 4


def test_public_inject_and_freeze_validate_once_each(monkeypatch):
    calls = _count_validations(monkeypatch)
    model = _Model()
    assert inject_lora(model, 'qkv', rank=2, prefixes=['backbone']) == [
        'backbone.blocks.0.attn.qkv', 'backbone.blocks.1.attn.qkv']
    assert len(calls) == 1
    freeze_base_model(model, 'backbone', trainable_norms=False)
    assert len(calls) == 2
    # Validation errors come from the config, named after its keys.
    with pytest.raises(ValueError, match='lora_config: LoRA alpha must be a number > 0'):
        inject_lora(_Model(), ['qkv'], alpha=0)
    with pytest.raises(ValueError, match='lora_config.target_modules must be a list'):
        inject_lora(_Model(), None)


def test_config_module_is_a_leaf():
    """config.py imports neither inject nor freeze (nor apply), so anything can import it."""
    tree = ast.parse(open(osp.abspath(config_module.__file__)).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(('.' * node.level) + (node.module or ''))
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    local = {name for name in imported if name.startswith('.') or 'eomt_mm' in name}
    assert local == {'.layer', '.matching'}
