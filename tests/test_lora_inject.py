"""inject_lora / apply_lora: target matching on mmpretrain and timm-style ViTs, options, errors."""
import re

import pytest
import torch
from torch import nn

from eomt_mm.lora import LoRAConfig, LoRALinear, apply_lora, get_lora_config, inject_lora
from eomt_mm.lora.matching import block_index, match_name

DEFAULT_TARGETS = ['qkv', 'proj', 'fc1', 'fc2']


# ------------------------------------------------------------------ test-local models
class _Attn(nn.Module):

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):

    def __init__(self, d):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):

    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), _Attn(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d), _Mlp(d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmStyleViT(nn.Module):
    """timm naming: patch_embed.proj (a Conv2d), blocks.{i}.attn.qkv/proj, mlp.fc1/fc2."""

    def __init__(self, d=32, depth=3, heads=2, patch=8, num_classes=5):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, img):
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return self.head(self.norm(self.blocks(x))[:, 0])


def _mmpretrain_vit(layer_scale=0.0):
    from mmpretrain.registry import MODELS
    return MODELS.build(
        # Scoped name: another test may have left 'mmseg' as the default scope, where a bare
        # 'VisionTransformer' resolves to mmseg's ViT.
        dict(type='mmpretrain.VisionTransformer',
             arch=dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64),
             img_size=32, patch_size=8, layer_scale_init_value=layer_scale,
             out_type='cls_token'))


def _lora_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


# ------------------------------------------------------------------------ matching
def test_matching_rules():
    # the default LoRA targets are aliases for the block layers of both code bases
    assert match_name('blocks.0.attn.qkv', 'qkv')
    assert match_name('backbone.layers.3.attn.proj', 'proj')
    assert not match_name('patch_embed.proj', 'proj')
    assert match_name('layers.1.ffn.layers.0.0', 'fc1')
    assert match_name('layers.1.ffn.layers.1', 'fc2')
    assert not match_name('layers.1.ffn.layers.0', 'fc1')  # the Sequential, not the Linear
    assert match_name('blocks.2.mlp.fc2', 'fc2')
    # dotted suffix on component boundaries, never substring
    assert match_name('attn.proj', 'attn.proj')
    assert match_name('a.b.attn.proj', 'attn.proj')
    assert not match_name('a.xattn.proj', 'attn.proj')
    assert not match_name('decode_head.class_head', 'head')
    assert match_name('decode_head.head', 'head')
    # regex: full match only
    assert match_name('blocks.1.attn.qkv', r'blocks\.[01]\.attn\.qkv')
    assert not match_name('blocks.1.attn.qkv', r'attn\.qkv')
    assert match_name('blocks.1.attn.qkv', r'.*\.qkv')
    assert block_index('backbone.layers.3.ffn.layers.0.0') == ('backbone.layers', 3)
    assert block_index('blocks.11.attn.qkv') == ('blocks', 11)
    assert block_index('decode_head.class_head') is None


def test_timm_style_default_targets_and_outputs_unchanged():
    model = TimmStyleViT(depth=3)
    x = torch.randn(2, 3, 32, 32)
    y0 = model(x)
    done = inject_lora(model, DEFAULT_TARGETS, rank=4, alpha=8)
    expected = sorted(f'blocks.{i}.{s}' for i in range(3)
                      for s in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'))
    assert sorted(done) == expected == _lora_names(model)
    assert isinstance(model.patch_embed.proj, nn.Conv2d)  # 'proj' did not hit the conv
    assert type(model.head) is nn.Linear
    assert torch.equal(model(x), y0)
    layer = model.blocks[1].attn.qkv
    assert (layer.rank, layer.alpha, layer.scaling) == (4, 8.0, 2.0)


@pytest.mark.parametrize('layer_scale', [0.0, 1e-5])
def test_mmpretrain_vit_default_targets(layer_scale):
    model = _mmpretrain_vit(layer_scale)
    model.eval()  # mmpretrain's train() returns None: no chaining
    x = torch.randn(2, 3, 32, 32)
    y0 = model(x)[-1]
    done = inject_lora(model, DEFAULT_TARGETS, rank=2, alpha=4)
    expected = sorted(f'layers.{i}.{s}' for i in range(2)
                      for s in ('attn.qkv', 'attn.proj', 'ffn.layers.0.0', 'ffn.layers.1'))
    assert sorted(done) == expected
    assert torch.equal(model(x)[-1], y0)
    # the adapters are in the compute path: a non-zero B changes the output
    with torch.no_grad():
        model.layers[0].ffn.layers[0][0].lora_B.normal_()
    assert not torch.allclose(model(x)[-1], y0)


def test_real_timm_vit():
    timm_vit = pytest.importorskip('timm.models.vision_transformer')
    model = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                       num_heads=2, mlp_ratio=2.0, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    y0 = model(x)
    done = inject_lora(model, DEFAULT_TARGETS, rank=2, alpha=4, qkv_enable=[True, False, True])
    assert len(done) == 8 and all(n.startswith('blocks.') for n in done)
    assert model.blocks[0].attn.qkv.enable_slices == (True, False, True)
    assert model.blocks[0].mlp.fc1.enable_slices is None
    assert torch.equal(model(x), y0)


def test_dotted_suffix_and_regex_targets():
    model = TimmStyleViT(depth=2)
    assert sorted(inject_lora(model, ['attn.proj'])) == ['blocks.0.attn.proj',
                                                         'blocks.1.attn.proj']
    model = TimmStyleViT(depth=2)
    assert inject_lora(model, [r'blocks\.1\.mlp\.fc[12]']) == ['blocks.1.mlp.fc1',
                                                              'blocks.1.mlp.fc2']
    model = TimmStyleViT(depth=2)
    assert inject_lora(model, ['head']) == ['head']


def test_layers_option():
    def adapted_blocks(layers):
        model = TimmStyleViT(depth=4)
        inject_lora(model, DEFAULT_TARGETS + ['head'], layers=layers) if layers is not None \
            else inject_lora(model, DEFAULT_TARGETS + ['head'])
        return sorted({block_index(n)[1] if block_index(n) else n for n in _lora_names(model)},
                      key=str)

    assert adapted_blocks(None) == [0, 1, 2, 3, 'head']
    assert adapted_blocks([0, 2]) == [0, 2]  # modules outside blocks are not adapted
    assert adapted_blocks([-1]) == [3]
    assert adapted_blocks(-2) == [2]
    assert adapted_blocks({'last': 2}) == [2, 3]
    with pytest.raises(ValueError, match=r"layer index 4 out of range: 'blocks' has 4 blocks"):
        inject_lora(TimmStyleViT(depth=4), DEFAULT_TARGETS, layers=[4])
    with pytest.raises(ValueError, match=r"'last'"):
        inject_lora(TimmStyleViT(depth=4), DEFAULT_TARGETS, layers={'last': 5})
    with pytest.raises(ValueError, match=r"\{'last': N\}"):
        inject_lora(TimmStyleViT(depth=4), DEFAULT_TARGETS, layers={'first': 1})
    with pytest.raises(ValueError, match='outside layers'):
        inject_lora(TimmStyleViT(depth=4), ['head'], layers=[0])


def test_mmpretrain_layers_last_n():
    model = _mmpretrain_vit()
    done = inject_lora(model, DEFAULT_TARGETS, layers={'last': 1})
    assert sorted(done) == ['layers.1.attn.proj', 'layers.1.attn.qkv',
                            'layers.1.ffn.layers.0.0', 'layers.1.ffn.layers.1']


def test_exclude_and_per_target_overrides():
    model = TimmStyleViT(depth=3)
    done = inject_lora(model, DEFAULT_TARGETS, rank=8, alpha=16,
                       exclude_modules=[r'blocks\.0\..*', 'mlp.fc2'],
                       rank_pattern={'qkv': 4, r'blocks\.2\..*': 2},
                       alpha_pattern={'fc1': 1.0})
    assert sorted(done) == sorted(f'blocks.{i}.{s}' for i in (1, 2)
                                  for s in ('attn.qkv', 'attn.proj', 'mlp.fc1'))
    b = model.blocks
    assert b[1].attn.qkv.rank == 4 and b[2].attn.qkv.rank == 4  # first pattern wins
    assert b[2].attn.proj.rank == 2 and b[1].attn.proj.rank == 8
    assert b[1].mlp.fc1.alpha == 1.0 and b[1].attn.proj.alpha == 16.0
    assert type(b[0].attn.qkv) is nn.Linear and type(b[1].mlp.fc2) is nn.Linear
    with pytest.raises(ValueError, match="rank_pattern key 'fc9' matches no adapted layer"):
        inject_lora(TimmStyleViT(), DEFAULT_TARGETS, rank_pattern={'fc9': 2})
    with pytest.raises(ValueError, match='rank must be a positive int'):
        inject_lora(TimmStyleViT(), DEFAULT_TARGETS, rank_pattern={'qkv': 0})


def test_qkv_enable():
    model = TimmStyleViT(depth=2)
    inject_lora(model, DEFAULT_TARGETS, rank=2, qkv_enable=[True, False, True])
    qkv = model.blocks[0].attn.qkv
    assert qkv.enable_slices == (True, False, True)
    assert qkv.lora_B.shape == (64, 2)
    assert model.blocks[0].attn.proj.enable_slices is None
    with pytest.raises(ValueError, match='no adapted layer is a fused qkv'):
        inject_lora(TimmStyleViT(), ['fc1'], qkv_enable=[True, False, True])


def test_follows_device_and_dtype_and_copies():
    model = TimmStyleViT(depth=1).double()
    w = model.blocks[0].attn.qkv.weight
    inject_lora(model, DEFAULT_TARGETS)
    new = model.blocks[0].attn.qkv
    assert new.lora_A.dtype == torch.float64 and new.weight.device == w.device
    assert torch.equal(new.weight, w) and new.weight.data_ptr() != w.data_ptr()


def test_plain_checkpoint_loads_into_adapted_model():
    plain = TimmStyleViT(depth=2)
    adapted = TimmStyleViT(depth=2)
    inject_lora(adapted, DEFAULT_TARGETS)
    res = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert all(re.fullmatch(r'.*\.lora_[AB]', k) for k in res.missing_keys)
    assert len(res.missing_keys) == 2 * 4 * 2
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(adapted(x), plain(x))
    plain_keys = set(plain.state_dict())
    assert set(adapted.state_dict()) == plain_keys | set(res.missing_keys)


# ---------------------------------------------------------------------------- errors
def test_error_target_matches_nothing_lists_linears():
    with pytest.raises(ValueError) as err:
        inject_lora(TimmStyleViT(depth=3), ['qkv', 'query'])
    msg = str(err.value)
    assert "['query'] matched no module" in msg
    assert 'blocks.*.attn.qkv (x3)' in msg and 'head' in msg
    assert 'patch_embed.proj' not in msg.split('exist:')[1]  # only Linear layers listed
    # a mmseg/mmcv-style ViT using nn.MultiheadAttention has no 'qkv'
    with pytest.raises(ValueError, match="\\['qkv'\\] matched no module"):
        inject_lora(nn.Sequential(nn.Linear(2, 2)), ['qkv'])


def test_error_match_is_not_linear():
    with pytest.raises(TypeError, match="'patch_embed.proj'.*Conv2d, not an nn.Linear"):
        inject_lora(TimmStyleViT(), ['patch_embed.proj'])
    with pytest.raises(TypeError, match="'blocks.0.attn'.*_Attn, not an nn.Linear"):
        inject_lora(TimmStyleViT(), [r'blocks\.0\.attn.*'])


def test_error_multihead_attention_out_proj():
    model = nn.Module()
    model.mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(TypeError, match='MultiheadAttention.*silently ignored'):
        inject_lora(model, ['out_proj'])


@pytest.mark.parametrize('kwargs, msg', [
    (dict(rank=0), 'rank must be a positive int'),
    (dict(rank=-1), 'rank must be a positive int'),
    (dict(alpha=0.0), 'alpha must be a number > 0'),
    (dict(alpha=-2), 'alpha must be a number > 0'),
    (dict(dropout=1.0), r'dropout must be in \[0, 1\)'),
    (dict(dropout=-0.5), r'dropout must be in \[0, 1\)'),
])
def test_error_bad_hyper_parameters(kwargs, msg):
    model = TimmStyleViT()
    with pytest.raises(ValueError, match=msg):
        inject_lora(model, DEFAULT_TARGETS, **kwargs)
    assert not _lora_names(model)  # validated before anything was replaced


def test_error_injecting_twice():
    model = TimmStyleViT()
    inject_lora(model, ['qkv'])
    with pytest.raises(TypeError, match='injected twice.*never nested'):
        inject_lora(model, DEFAULT_TARGETS)
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert type(model.blocks[0].attn.qkv.weight) is nn.Parameter
    with pytest.raises(TypeError, match='injected twice'):
        apply_lora(model, dict(target_modules=['qkv'], base_prefixes=['']))


def test_error_bad_patterns_and_prefix():
    with pytest.raises(ValueError, match='not a valid regular expression'):
        inject_lora(TimmStyleViT(), ['blocks.(0'])
    with pytest.raises(ValueError, match='target_modules is empty'):
        inject_lora(TimmStyleViT(), [])
    with pytest.raises(ValueError, match=r"prefix 'backbone' is not a submodule.*'blocks'"):
        inject_lora(TimmStyleViT(), DEFAULT_TARGETS, prefixes=['backbone'])


# ------------------------------------------------------------------------- apply_lora
def test_apply_lora_default_config_on_whole_model():
    model = TimmStyleViT(depth=2)
    cfg = dict(enabled=True, rank=8, lora_alpha=16, lora_dropout=0.1,
               target_modules=DEFAULT_TARGETS, freeze_base_model=True, base_prefixes=[''])
    assert apply_lora(model, cfg) is model
    assert len(_lora_names(model)) == 8
    assert model.blocks[0].attn.qkv.dropout == 0.1
    got = get_lora_config(model)
    assert isinstance(got, LoRAConfig) and got.rank == 8 and got.lora_dropout == 0.1
    assert LoRAConfig.from_dict(got.to_dict()) == got


def test_apply_lora_only_inside_base_prefixes():
    model = nn.Module()
    model.backbone = TimmStyleViT(depth=2)
    model.decode_head = TimmStyleViT(depth=1)
    apply_lora(model, dict(target_modules=DEFAULT_TARGETS))
    names = _lora_names(model)
    assert len(names) == 8 and all(n.startswith('backbone.') for n in names)


# enabled=False: nothing is applied (targets are not looked up), but the block is still
# validated, so a typo in a disabled config is caught too.
@pytest.mark.parametrize('cfg', [None, dict(enabled=False, rank=4, target_modules=['nope'])])
def test_apply_lora_noop(cfg):
    model = TimmStyleViT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_lora(model, cfg) is model
    assert not _lora_names(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert get_lora_config(model) is None


def test_disabled_config_is_still_validated():
    with pytest.raises(ValueError, match='unknown key'):
        apply_lora(TimmStyleViT(), dict(enabled=False, lora_rnak=4))


def test_apply_lora_config_errors():
    with pytest.raises(ValueError) as err:
        apply_lora(TimmStyleViT(), dict(rank=4, lora_rank=4))
    assert "unknown key(s) ['lora_rank']" in str(err.value)
    assert 'lora_alpha' in str(err.value) and 'target_modules' in str(err.value)
    bad = [
        (dict(rank=0), 'rank must be a positive int'),
        (dict(lora_alpha=0), 'alpha must be a number > 0'),
        (dict(lora_dropout=1.5), r'dropout must be in \[0, 1\)'),
        (dict(target_modules=[]), 'target_modules is empty'),
        (dict(qkv_enable=[False, False, False]), 'qkv_enable must be a list of bools'),
        (dict(enabled='yes'), 'enabled must be a bool'),
        (dict(layers='last'), 'layers must be None'),
        (dict(rank_pattern={'qkv': -1}), r"rank_pattern\['qkv'\]"),
        (dict(exclude_modules=['(']), 'not a valid regular expression'),
    ]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            apply_lora(TimmStyleViT(), cfg)
    with pytest.raises(TypeError, match='lora_config must be a dict'):
        apply_lora(TimmStyleViT(), ['qkv'])
    with pytest.raises(ValueError, match="base prefix|prefix 'backbone'"):
        apply_lora(TimmStyleViT(), dict(target_modules=DEFAULT_TARGETS))


def test_apply_lora_accepts_mmengine_configdict():
    from mmengine.config import ConfigDict
    model = TimmStyleViT(depth=2)
    cfg = ConfigDict(target_modules=('qkv', ), layers=dict(last=1), base_prefixes=[''],
                     qkv_enable=(True, False, True))
    apply_lora(model, cfg)
    assert _lora_names(model) == ['blocks.1.attn.qkv']
    assert type(get_lora_config(model).layers) is dict


def test_project_dinov2_backbone_with_registers():
    """The project's DINOv2 (mmpretrain names, register tokens), default LoRA targets."""
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(
            dict(type='DINOv2',
                 arch=dict(embed_dims=32, num_layers=3, num_heads=2, feedforward_channels=64),
                 patch_size=16, num_register_tokens=4, img_size=64))
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    y0 = model(x)[-1]
    apply_lora(model, dict(rank=2, lora_alpha=4, target_modules=DEFAULT_TARGETS,
                           layers={'last': 2}, qkv_enable=[True, False, True],
                           base_prefixes=['']))
    assert _lora_names(model) == sorted(
        f'layers.{i}.{s}' for i in (1, 2)
        for s in ('attn.qkv', 'attn.proj', 'ffn.layers.0.0', 'ffn.layers.1'))
    assert torch.equal(model(x)[-1], y0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert 'register_tokens' not in trainable and 'cls_token' not in trainable
    assert 'layers.0.attn.qkv.weight' not in trainable
    assert {'layers.2.attn.qkv.lora_A', 'layers.0.ln1.weight', 'ln1.weight'} <= trainable
    # the adapters sit in the compute path of forward() and of EoMT's forward_block()
    tokens, _ = model.embed(x)
    with torch.no_grad():
        b0 = model.forward_block(2, tokens, None)
        model.layers[2].attn.proj.lora_B.normal_()
        assert not torch.equal(model.forward_block(2, tokens, None), b0)
    assert not torch.equal(model(x)[-1], y0)


def test_default_targets_reach_swiglu_linears_of_dinov2_giant_layout():
    """ViT-g's SwiGLU MLP has ffn.w12 / ffn.w3, not fc1 / fc2; the default targets cover it."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    backbone = MODELS.build(dict(
        type='DINOv2', patch_size=8, img_size=32,
        arch=dict(embed_dims=48, num_layers=2, num_heads=2, feedforward_channels=96,
                  ffn_type='swiglu_fused')))
    names = inject_lora(backbone, ['qkv', 'proj', 'fc1', 'fc2'], rank=4, alpha=8)
    assert sorted(names) == sorted(
        f'layers.{i}.{leaf}' for i in range(2) for leaf in ('attn.qkv', 'attn.proj', 'ffn.w12', 'ffn.w3'))
