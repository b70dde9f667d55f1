"""DINOv3 backbone: tokens equal transformers' DINOv3ViTModel (RoPE on, non-square input, plain MLP
and SwiGLU, eval and train mode), RoPE on the patch tokens only, train-time coordinate
augmentations, the zero key bias, arch presets, state-dict names, loading checks, LoRA."""
import re

import pytest
import torch
from mmseg.registry import MODELS

from eomt_mm.lora import inject_lora
from eomt_mm.models.backbones import DINOv3
from eomt_mm.models.backbones.rope import patch_center_coords, rotate_patch_tokens

EMBED, DEPTH, HEADS, REG, HIDDEN = 32, 2, 2, 4, 64


def _arch(gated: bool) -> dict:
    # mmpretrain's SwiGLUFFNFused keeps (int(2F/3) + 7) // 8 * 8 hidden channels: 96 -> 64.
    return dict(embed_dims=EMBED, num_layers=DEPTH, num_heads=HEADS,
                feedforward_channels=96 if gated else HIDDEN,
                ffn_type='swiglu_fused' if gated else 'origin')


def _ours(gated: bool = False, **kwargs) -> DINOv3:
    return DINOv3(arch=_arch(gated), out_type='raw', **kwargs)


def _randomize(module: torch.nn.Module) -> None:
    """Random values everywhere, layer scale far from its init so it matters; a DINOv3 key bias
    stays zero."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if 'lambda1' in name or 'gamma' in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            if re.fullmatch(r'layers\.\d+\.attn\.qkv\.bias', name):
                p[EMBED:2 * EMBED] = 0


def _hf_model(gated: bool, **aug):
    transformers = pytest.importorskip('transformers')
    config = transformers.DINOv3ViTConfig(
        hidden_size=EMBED, intermediate_size=HIDDEN, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, num_register_tokens=REG, patch_size=16, image_size=64,
        layer_norm_eps=1e-5, use_gated_mlp=gated, hidden_act='silu' if gated else 'gelu',
        **aug)
    model = transformers.DINOv3ViTModel(config)
    _randomize(model)
    return model.eval()


def hf_to_ours(sd: dict, num_layers: int, gated: bool, layer_prefix: str = 'model.layer.',
               final_norm: str = 'norm') -> dict:
    """transformers DINOv3ViTModel (EoMT-DINOv3: ``layers.``, ``layernorm``) state dict ->
    this project's DINOv3 keys (test-local)."""
    out = {'cls_token': sd['embeddings.cls_token'],
           'register_tokens': sd['embeddings.register_tokens'],
           'patch_embed.projection.weight': sd['embeddings.patch_embeddings.weight'],
           'patch_embed.projection.bias': sd['embeddings.patch_embeddings.bias'],
           'ln1.weight': sd[final_norm + '.weight'], 'ln1.bias': sd[final_norm + '.bias']}
    for i in range(num_layers):
        src, dst = f'{layer_prefix}{i}.', f'layers.{i}.'
        att = src + 'attention.'
        q_bias = sd[att + 'q_proj.bias']
        out.update({
            dst + 'attn.qkv.weight': torch.cat([sd[att + f'{n}_proj.weight'] for n in 'qkv']),
            dst + 'attn.qkv.bias': torch.cat([q_bias, torch.zeros_like(q_bias),
                                              sd[att + 'v_proj.bias']]),
            dst + 'attn.gamma1.weight': sd[src + 'layer_scale1.lambda1'],
            dst + 'ffn.gamma2.weight': sd[src + 'layer_scale2.lambda1']})
        pairs = [('ln1', 'norm1'), ('ln2', 'norm2'), ('attn.proj', 'attention.o_proj')] + (
            [('ffn.w3', 'mlp.down_proj')] if gated else
            [('ffn.layers.0.0', 'mlp.up_proj'), ('ffn.layers.1', 'mlp.down_proj')])
        for ours, theirs in pairs:
            for leaf in ('weight', 'bias'):
                out[f'{dst}{ours}.{leaf}'] = sd[f'{src}{theirs}.{leaf}']
        if gated:  # w12 = [gate; up]: the fused FFN computes silu(first half) * second half
            for leaf in ('weight', 'bias'):
                out[f'{dst}ffn.w12.{leaf}'] = torch.cat(
                    [sd[f'{src}mlp.gate_proj.{leaf}'], sd[f'{src}mlp.up_proj.{leaf}']])
    return out


def _pair(gated: bool, ours_aug: dict = None, hf_aug: dict = None):
    hf = _hf_model(gated, **(hf_aug or {}))
    ours = _ours(gated, **(ours_aug or {}))
    ours.load_state_dict(hf_to_ours(hf.state_dict(), DEPTH, gated), strict=True)
    return hf, ours.eval()


# ------------------------------------------------------------------ equality with transformers
@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
def test_tokens_equal_transformers_eval(gated):
    hf, ours = _pair(gated)
    x = torch.randn(2, 3, 48, 80)  # non-square: a 3 x 5 patch grid
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        got = ours(x)[0]
    assert got.shape == (2, 1 + REG + 15, EMBED)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
def test_tokens_equal_transformers_train_mode_augmentations_off(gated):
    off = dict(pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None)
    hf, ours = _pair(gated, off, off)
    hf.train(), ours.train()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(pixel_values=x).last_hidden_state,
                                   atol=1e-5, rtol=0)


def test_seeded_train_mode_augmentations_equal_transformers():
    """Same random draws as transformers' augment_patches_center_coordinates (all three on)."""
    aug = dict(pos_embed_shift=0.2, pos_embed_jitter=1.5, pos_embed_rescale=2.0)
    hf, ours = _pair(False, aug, aug)
    hf.train(), ours.train()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.manual_seed(11)
        expected = hf(pixel_values=x).last_hidden_state
        torch.manual_seed(11)
        got = ours(x)[0]
        ours.eval()
        plain = ours(x)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the augmentation did something


def test_default_augmentation_is_the_hub_rescale_and_eval_never_augments():
    ours = _ours()
    assert (ours.pos_embed_shift, ours.pos_embed_jitter, ours.pos_embed_rescale) == (None, None,
                                                                                      2.0)
    _randomize(ours)
    x = torch.randn(1, 3, 32, 48)
    ours.train()
    with torch.no_grad():
        train_a, train_b = ours(x)[0], ours(x)[0]
        ours.eval()
        eval_a, eval_b = ours(x)[0], ours(x)[0]
    assert (train_a - train_b).abs().max() > 1e-4  # a fresh rescale per forward
    assert torch.equal(eval_a, eval_b)
    off = _ours(pos_embed_rescale=None).eval()
    off.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(off(x)[0], eval_a, atol=0, rtol=0)


# ------------------------------------------------------------------ RoPE on patch tokens only
def test_prepended_tokens_get_no_rope_and_do_not_shift_the_grid():
    """EoMT prepends queries: the patch grid stays the LAST h*w tokens, the queries get no RoPE."""
    ours = _ours().eval()
    _randomize(ours)
    tokens, hw = ours.embed(torch.randn(2, 3, 32, 48))
    n, extra = tokens.shape[1], 3
    queries = torch.randn(2, extra, EMBED)
    # Nobody attends to the queries, so the other tokens must come out as without them.
    mask = torch.ones(1, 1, n + extra, n + extra, dtype=torch.bool)
    mask[:, :, :, :extra] = False
    mask[:, :, :extra, :extra] = True
    with torch.no_grad():
        alone = ours.forward_block(0, tokens)
        with_queries = ours.forward_block(0, torch.cat([queries, tokens], 1), mask)
    torch.testing.assert_close(with_queries[:, extra:], alone, atol=1e-6, rtol=0)
    # Prefix rows pass the rotation unchanged; patch rows are rotated (norm-preserving).
    cos, sin = ours._rope
    x = torch.randn(1, HEADS, n + extra, EMBED // HEADS)
    rotated = rotate_patch_tokens(x, cos, sin)
    assert torch.equal(rotated[:, :, :n + extra - hw[0] * hw[1]], x[:, :, :-hw[0] * hw[1]])
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(rotated[:, :, -6:], x[:, :, -6:])


def test_patch_coordinates_are_normalised_per_axis():
    coords = patch_center_coords(2, 4, torch.device('cpu'))
    torch.testing.assert_close(coords[:, 0], torch.tensor([-.5] * 4 + [.5] * 4))
    torch.testing.assert_close(coords[:4, 1], torch.tensor([-.75, -.25, .25, .75]))


def test_any_multiple_of_16_works_and_other_sizes_are_refused():
    ours = _ours().eval()
    for size in [(16, 16), (32, 112), (80, 48)]:
        assert ours(torch.randn(1, 3, *size))[0].shape[1] == 1 + REG + size[0] * size[1] // 256
    with pytest.raises(ValueError, match='not a multiple of the patch size 16'):
        ours(torch.randn(1, 3, 50, 64))
    with pytest.raises(RuntimeError, match='call embed'):
        _ours().forward_block(0, torch.randn(1, 9, EMBED))
    ours.embed(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match='patches of the latest embed'):
        ours.forward_block(0, torch.randn(1, 6, EMBED))


# ------------------------------------------------------------------ names, archs, registry
_KEY_PATTERNS = [r'cls_token', r'register_tokens', r'patch_embed\.projection\.(weight|bias)',
                 r'layers\.\d\.ln[12]\.(weight|bias)',
                 r'layers\.\d\.attn\.(qkv|proj)\.(weight|bias)',
                 r'layers\.\d\.attn\.gamma1\.weight', r'layers\.\d\.ffn\.gamma2\.weight',
                 r'ln1\.(weight|bias)']


@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
def test_state_dict_names(gated):
    model = _ours(gated)
    ffn = [r'layers\.\d\.ffn\.(w12|w3)\.(weight|bias)'] if gated else [
        r'layers\.\d\.ffn\.layers\.(0\.0|1)\.(weight|bias)']
    keys = list(model.state_dict())
    assert all(any(re.fullmatch(p, k) for p in _KEY_PATTERNS + ffn) for k in keys), keys
    assert len(keys) == 6 + DEPTH * 14
    assert 'pos_embed' not in keys and not list(model.buffers())


# (arch, embed, depth, heads, FFN hidden, SwiGLU, qkv bias, parameters in millions as in Meta's
# DINOv3 README model table)
_ARCHS = [('s', 384, 12, 6, 1536, False, True, 21), ('s+', 384, 12, 6, 1536, True, True, 29),
          ('b', 768, 12, 12, 3072, False, True, 86), ('l', 1024, 24, 16, 4096, False, True, 300),
          ('h+', 1280, 32, 20, 5120, True, True, 840), ('7b', 4096, 40, 32, 8192, True, False,
                                                          6716)]


@pytest.mark.parametrize('arch,embed,depth,heads,hidden,gated,bias,millions', _ARCHS)
def test_arch_presets(arch, embed, depth, heads, hidden, gated, bias, millions):
    with torch.device('meta'):
        model = MODELS.build(dict(type='DINOv3', arch=arch))
    assert (model.embed_dims, model.num_layers, model.num_heads) == (embed, depth, heads)
    assert model.patch_size == 16 and model.num_prefix_tokens == 5
    assert model.patch_embed.projection.weight.shape == (embed, 3, 16, 16)
    layer = model.layers[0]
    fc1 = layer.ffn.w12 if gated else layer.ffn.layers[0][0]
    assert fc1.out_features == (2 * hidden if gated else hidden)
    assert (layer.attn.qkv.bias is not None) == bias
    assert layer.ln1.eps == model.ln1.eps == 1e-5
    assert (model.pos_embed_shift, model.pos_embed_jitter, model.pos_embed_rescale,
            model.rope_base) == (None, None, 2.0, 100.0)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.03, count  # the README rounds (S: 21.6M)


def test_arch_aliases():
    zoo = DINOv3.arch_zoo
    assert zoo['b'] is zoo['base'] is zoo['vitb16'] is zoo['dinov3-b'] is zoo['dinov3-vitb16']
    assert zoo['h+'] is zoo['huge-plus'] is zoo['vith16plus'] is zoo['dinov3-h+']
    assert zoo['s+'] is zoo['vits16plus'] and zoo['7b'] is zoo['vit7b16']


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='Unknown DINOv3 arch'):
        DINOv3(arch='g')
    with pytest.raises(ValueError, match='needs keys'):
        DINOv3(arch=dict(embed_dims=32, num_layers=2))
    with pytest.raises(ValueError, match='divisible by 4'):
        DINOv3(arch=dict(embed_dims=36, num_layers=1, num_heads=6, feedforward_channels=8))
    with pytest.raises(ValueError, match='pos_embed_rescale must be None or >= 1'):
        _ours(pos_embed_rescale=0.5)
    with pytest.raises(ValueError, match='pos_embed_shift'):
        _ours(pos_embed_shift=-1.0)


def test_layer_depths_and_freezing():
    model = _ours(frozen_stages=1)
    assert model.get_layer_depth('backbone.cls_token', 'backbone.') == (1, DEPTH + 1)
    assert model.get_layer_depth('backbone.register_tokens', 'backbone.') == (1, DEPTH + 1)
    assert model.get_layer_depth('backbone.layers.1.attn.qkv.weight', 'backbone.') == (2, 3)
    assert model.get_layer_depth('backbone.ln1.weight', 'backbone.') == (2, 3)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {'cls_token', 'register_tokens', 'patch_embed.projection.weight',
            'layers.0.attn.qkv.weight'} <= frozen
    assert not any(n.startswith('layers.1.') for n in frozen)


# ------------------------------------------------------------------ key bias and loading
def _key_bias(model, i=0):
    return model.layers[i].attn.qkv.bias[EMBED:2 * EMBED]


def test_key_bias_is_zero_after_init_and_load_and_never_trained():
    model = _ours()
    assert all(not _key_bias(model, i).any() for i in range(DEPTH))
    model.init_weights()
    assert not _key_bias(model).any()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd['layers.1.attn.qkv.bias'][EMBED:2 * EMBED] = 3.0  # Meta stores unused (masked) values
    model.load_state_dict(sd)
    assert not _key_bias(model, 1).any() and sd['layers.1.attn.qkv.bias'][EMBED:].any()
    _randomize(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 32, 32))[0].square().mean().backward()
        opt.step()
    grad = model.layers[0].attn.qkv.bias.grad
    assert not grad[EMBED:2 * EMBED].any() and grad[:EMBED].abs().sum() > 0
    assert grad[2 * EMBED:].abs().sum() > 0
    assert all(not _key_bias(model, i).any() for i in range(DEPTH))


def test_key_bias_gradient_stays_zero_after_lora_replaces_qkv():
    model = _ours()
    _randomize(model)
    inject_lora(model, ['qkv'], rank=2, alpha=4)  # a copied Linear: a new bias parameter
    model.train()
    model(torch.randn(1, 3, 32, 32))[0].sum().backward()
    grad = model.layers[0].attn.qkv.bias.grad
    assert not grad[EMBED:2 * EMBED].any() and grad[:EMBED].abs().sum() > 0


@pytest.mark.parametrize('key,value,message', [
    ('pos_embed', torch.zeros(1, 4, EMBED), 'learned position table'),
    ('storage_tokens', torch.zeros(1, 4, EMBED), 'meta-dinov3'),
    ('rope_embed.periods', torch.zeros(4), 'meta-dinov3'),
    ('layers.0.attn.qkv.bias_mask', torch.zeros(3 * EMBED), 'meta-dinov3'),
    ('embeddings.cls_token', torch.zeros(1, 1, EMBED), 'hf-dinov3'),
    ('patch_embed.projection.weight', torch.zeros(EMBED, 3, 14, 14), 'not resampled'),
    ('layers.5.ln1.weight', torch.zeros(EMBED), 'this model has 2'),
])
def test_loading_refuses_misfits(key, value, message):
    model = _ours()
    sd = dict(model.state_dict(), **{key: value})
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(sd, strict=False)


def test_loading_refuses_missing_registers_and_missing_file(tmp_path):
    model = _ours()
    sd = model.state_dict()
    sd.pop('register_tokens')
    with pytest.raises(ValueError, match='lacks register_tokens'):
        model.load_state_dict(sd, strict=False)
    missing = _ours(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'none.pth')))
    with pytest.raises(FileNotFoundError, match='--format meta-dinov3'):
        missing.init_weights()


# ------------------------------------------------------------------ LoRA targets and slices
@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
def test_default_lora_targets_and_qv_slices(gated):
    model = _ours(gated).eval()
    _randomize(model)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        y0 = model(x)[0]
    names = inject_lora(model, ['qkv', 'proj', 'fc1', 'fc2'], rank=2, alpha=4,
                        qkv_enable=[True, False, True])
    ffn = ('ffn.w12', 'ffn.w3') if gated else ('ffn.layers.0.0', 'ffn.layers.1')
    assert sorted(names) == sorted(f'layers.{i}.{leaf}' for i in range(DEPTH)
                                   for leaf in ('attn.qkv', 'attn.proj') + ffn)
    with torch.no_grad():
        assert torch.equal(model(x)[0], y0)
        qkv = model.layers[0].attn.qkv
        qkv.lora_B.normal_()
        tokens = torch.randn(1, 7, EMBED)
        delta = qkv(tokens) - torch.nn.functional.linear(tokens, qkv.weight, qkv.bias)
        assert not model(x)[0].allclose(y0)
    assert not delta[..., EMBED:2 * EMBED].any()  # the key slice gets an exactly-zero update
    assert delta[..., :EMBED].abs().sum() > 0 and delta[..., 2 * EMBED:].abs().sum() > 0
