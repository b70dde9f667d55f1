"""DINOv2 backbone: equality with timm's reg4 DINOv2 ViT, block API, errors, lr decay depths."""
import math

import pytest
import torch
import torch.nn.functional as F

from eomt_mm.models.backbones import DINOv2
from eomt_mm.converters import convert_state_dict
from mmseg.registry import MODELS

timm_vit = pytest.importorskip('timm.models.vision_transformer')

TINY = dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=128)


def _randomize(module: torch.nn.Module) -> None:
    """Random values everywhere, layer scale far from its 1e-5 init so it matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if 'gamma' in name:  # timm `ls1.gamma`, ours `attn.gamma1.weight`
                p.copy_(torch.rand_like(p) + 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.2)


def _timm_model(patch: int, grid: int, reg: int = 4) -> torch.nn.Module:
    model = timm_vit.VisionTransformer(
        img_size=patch * grid, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
        reg_tokens=reg, no_embed_class=True, init_values=1e-5, dynamic_img_size=True,
        num_classes=0, class_token=True)
    _randomize(model)
    return model.eval()


def _ours_from_timm(timm_model, patch: int, grid: int, reg: int = 4, arch: dict = TINY,
                    **kwargs) -> DINOv2:
    sd, _, _ = convert_state_dict(timm_model.state_dict(), 'timm')
    ours = DINOv2(arch=arch, img_size=patch * grid, patch_size=patch, num_register_tokens=reg,
                  out_type='raw', **kwargs)
    missing, unexpected = ours.load_state_dict(
        {k[len('backbone.'):]: v for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected
    ours.eval()  # mmpretrain's BaseBackbone.train() returns None
    return ours


@pytest.mark.parametrize('patch', [14, 16])
@pytest.mark.parametrize('hw', [(4, 4), (3, 5), (6, 2)])
def test_tokens_equal_timm_reg4(patch, hw):
    timm_model = _timm_model(patch, grid=4)
    ours = _ours_from_timm(timm_model, patch, grid=4)
    x = torch.randn(2, 3, hw[0] * patch, hw[1] * patch)
    with torch.no_grad():
        ref_embed = timm_model._pos_embed(timm_model.patch_embed(x))
        tokens, grid = ours.embed(x)
        assert grid == hw
        assert tokens.shape == (2, 1 + 4 + hw[0] * hw[1], 32)
        torch.testing.assert_close(tokens, ref_embed, atol=1e-5, rtol=0)
        ref = timm_model.forward_features(x)
        (out,) = ours(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # The comparison is meaningful: layer scale and registers change the output.
    assert ref.abs().mean() > 0.1


def test_no_registers_equal_timm():
    timm_model = _timm_model(14, grid=3, reg=0)
    ours = _ours_from_timm(timm_model, 14, grid=3, reg=0)
    x = torch.randn(1, 3, 56, 42)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], timm_model.forward_features(x), atol=1e-5, rtol=0)
    assert ours.num_prefix_tokens == 1 and ours.register_tokens is None


def test_featmap_output_and_registry():
    model = MODELS.build(dict(type='DINOv2', arch=TINY, img_size=32, patch_size=16,
                              out_indices=(0, 1)))
    model.init_weights()
    outs = model(torch.randn(2, 3, 64, 48))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 4, 3)] * 2
    assert model.num_prefix_tokens == 5 and model.patch_size == 16 and model.embed_dims == 32


@pytest.mark.parametrize('size', [(30, 32), (32, 33)])
def test_input_not_multiple_of_patch_raises(size):
    model = DINOv2(arch=TINY, img_size=32, patch_size=16)
    with pytest.raises(ValueError, match='not a multiple of the patch size 16'):
        model.embed(torch.randn(1, 3, *size))
    with pytest.raises(ValueError, match='not a multiple of the patch size 16'):
        model(torch.randn(1, 3, *size))


def test_bad_construction_raises():
    with pytest.raises(ValueError, match='multiples of patch_size'):
        DINOv2(arch=TINY, img_size=30, patch_size=16)
    with pytest.raises(ValueError, match='Unknown DINOv2 arch'):
        DINOv2(arch='huge')
    with pytest.raises(ValueError, match='needs keys'):
        DINOv2(arch=dict(embed_dims=32))


def _reference_block(layer, x, mask, num_heads):
    """Plain statement of a pre-norm ViT block with a boolean attention mask."""
    sd = {k: v for k, v in layer.state_dict().items()}
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), sd['ln1.weight'], sd['ln1.bias'], eps=1e-6)
    qkv = h @ sd['attn.qkv.weight'].T + sd['attn.qkv.bias']
    q, k, v = qkv.reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(c // num_heads)
    logits = logits.masked_fill(~mask, float('-inf'))
    att = logits.softmax(-1) @ v
    att = att.transpose(1, 2).reshape(b, n, c) @ sd['attn.proj.weight'].T + sd['attn.proj.bias']
    x = x + sd['attn.gamma1.weight'] * att
    h = F.layer_norm(x, (c,), sd['ln2.weight'], sd['ln2.bias'], eps=1e-6)
    h = F.gelu(h @ sd['ffn.layers.0.0.weight'].T + sd['ffn.layers.0.0.bias'])
    h = h @ sd['ffn.layers.1.weight'].T + sd['ffn.layers.1.bias']
    return x + sd['ffn.gamma2.weight'] * h


@pytest.mark.parametrize('heads_dim', [1, 2])
def test_forward_block_masked_equals_plain_sdpa(heads_dim):
    model = DINOv2(arch=TINY, img_size=32, patch_size=16)
    model.eval()
    _randomize(model)
    x = torch.randn(2, 9, 32)
    mask = torch.rand(2, heads_dim, 9, 9) > 0.5
    mask |= torch.eye(9, dtype=torch.bool)  # every row attends somewhere
    out = model.forward_block(1, x, mask)
    ref = _reference_block(model.layers[1], x, mask.expand(2, 2, 9, 9), num_heads=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The mask matters, and without a mask the block equals mmpretrain's own layer.
    assert (model.forward_block(1, x) - out).abs().max() > 1e-3
    torch.testing.assert_close(model.forward_block(1, x), model.layers[1](x), atol=1e-6, rtol=0)


def test_forward_block_bad_mask_raises():
    model = DINOv2(arch=TINY, img_size=32, patch_size=16)
    x = torch.randn(2, 9, 32)
    with pytest.raises(TypeError, match='bool'):
        model.forward_block(0, x, torch.zeros(2, 1, 9, 9))
    with pytest.raises(ValueError, match='attn_mask must have shape'):
        model.forward_block(0, x, torch.ones(2, 1, 8, 9, dtype=torch.bool))
    with pytest.raises(IndexError):
        model.forward_block(2, x)


def test_final_norm_is_ln1():
    model = DINOv2(arch=TINY, img_size=32, patch_size=16)
    _randomize(model)
    x = torch.randn(1, 5, 32)
    torch.testing.assert_close(model.final_norm(x), model.ln1(x))


def test_giant_swiglu_layer_names_and_timm_equality():
    arch = dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=96,
                ffn_type='swiglu_fused')
    model = DINOv2(arch=arch, img_size=28, patch_size=14)
    names = set(model.state_dict())
    assert {'layers.0.ffn.w12.weight', 'layers.0.ffn.w3.weight',
            'layers.0.ffn.gamma2.weight'} <= names
    assert model.layers[0].ffn.w12.out_features == 2 * 64
    timm_layers = pytest.importorskip('timm.layers')
    timm_model = timm_vit.VisionTransformer(
        img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
        mlp_layer=timm_layers.SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=4,
        no_embed_class=True, init_values=1e-5, dynamic_img_size=True, num_classes=0)
    _randomize(timm_model)
    timm_model.eval()
    ours = _ours_from_timm(timm_model, 14, grid=2, arch=arch)
    assert ours.ffn_type == 'swiglu_fused'
    x = torch.randn(1, 3, 42, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], timm_model.forward_features(x), atol=1e-5, rtol=0)


def test_dinov2_arch_presets():
    expected = {'s': (384, 12, 6), 'b': (768, 12, 12), 'l': (1024, 24, 16), 'g': (1536, 40, 24)}
    for name, (dims, layers, heads) in expected.items():
        for alias in (name, f'dinov2-{name}'):
            s = DINOv2.arch_zoo[alias]
            assert (s['embed_dims'], s['num_layers'], s['num_heads']) == (dims, layers, heads)
    assert DINOv2.arch_zoo['g']['ffn_type'] == 'swiglu_fused'


def test_layer_depth_matches_reference_llrd():
    from mmpretrain.engine.optimizers import LearningRateDecayOptimWrapperConstructor
    model = DINOv2(arch=dict(TINY, num_layers=3), img_size=32, patch_size=16)
    constructor = LearningRateDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.05)),
        dict(layer_decay_rate=0.8))
    wrapper = constructor(model)
    lrs = {g['param_name']: g['lr'] for g in wrapper.optimizer.param_groups}
    # reference: block i -> 0.8 ** (L - 1 - i); embeddings like block 0; final norm full lr.
    for i in range(3):
        assert lrs[f'layers.{i}.attn.qkv.weight'] == pytest.approx(0.8 ** (2 - i))
    for name in ('cls_token', 'register_tokens', 'pos_embed', 'patch_embed.projection.weight'):
        assert lrs[name] == pytest.approx(0.8 ** 2)
    assert lrs['ln1.weight'] == pytest.approx(1.0)
    assert model.get_layer_depth('decode_head.x', prefix='backbone.') == (3, 4)


def test_frozen_stages_freezes_registers():
    model = DINOv2(arch=TINY, img_size=32, patch_size=16, frozen_stages=1)
    assert not model.register_tokens.requires_grad and not model.cls_token.requires_grad
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())


def test_load_resamples_and_refuses_wrong_arch():
    src = DINOv2(arch=TINY, img_size=56, patch_size=14)  # 4x4 grid, 14 px kernel
    _randomize(src)
    dst = DINOv2(arch=TINY, img_size=64, patch_size=16)  # 4x4 grid, 16 px kernel
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst.pos_embed, src.pos_embed)
    assert dst.patch_embed.projection.weight.shape[-1] == 16
    other = DINOv2(arch=dict(TINY, num_layers=3), img_size=56, patch_size=14)
    with pytest.raises(ValueError, match='checkpoint has layers 0..1'):
        other.load_state_dict(src.state_dict())
    no_reg = DINOv2(arch=TINY, img_size=56, patch_size=14, num_register_tokens=0)
    with pytest.raises(ValueError, match='register_tokens'):
        no_reg.load_state_dict(src.state_dict(), strict=False)
    wide = DINOv2(arch=dict(TINY, embed_dims=64), img_size=56, patch_size=14)
    with pytest.raises(ValueError, match='does not fit DINOv2'):
        wide.load_state_dict(src.state_dict())


def test_train_returns_self_and_keeps_frozen_stages_in_eval():
    model = DINOv2(arch=TINY, img_size=32, patch_size=16, frozen_stages=1, drop_rate=0.1)
    assert model.train() is model and model.eval() is model
    model.train()
    assert not model.layers[0].training and model.layers[1].training
