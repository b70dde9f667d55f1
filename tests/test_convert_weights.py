"""tools/convert_weights.py: each format, resampling, refusal of checkpoints that don't fit."""
import argparse
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from eomt_mm.models.backbones import DINOv2
from eomt_mm.utils.resample import resample_patch_kernel, resize_pos_embed_grid
from eomt_mm.converters import DECODER_KEY_MAP, CheckpointConversionError, convert_state_dict

timm = pytest.importorskip('timm')
from timm.layers import resample_abs_pos_embed, resample_patch_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('convert_weights',
                                               ROOT / 'tools' / 'convert_weights.py')
convert_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_weights)

D = 32


def _randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if 'gamma' in name or 'lambda1' in name:
                p.copy_(torch.rand_like(p) + 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.2)


def _timm_vit(patch=14, grid=4, reg=4, **kwargs):
    model = VisionTransformer(img_size=patch * grid, patch_size=patch, embed_dim=D, depth=2,
                              num_heads=2, reg_tokens=reg, no_embed_class=True, init_values=1e-5,
                              dynamic_img_size=True, num_classes=0, **kwargs)
    _randomize(model)
    return model.eval()


def _convert(tmp_path, src_obj, fmt, *extra, name='src.pth'):
    src = tmp_path / name
    if name.endswith('.safetensors'):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in src_obj.items()}, str(src))
    else:
        torch.save(src_obj, src)
    dst = tmp_path / 'converted' / 'dst.pth'
    assert convert_weights.main([str(src), str(dst), '--format', fmt, *extra]) == 0
    assert [p.name for p in dst.parent.iterdir()] == ['dst.pth']  # atomic: no temp file left
    ckpt = torch.load(dst, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    return ckpt


def _backbone(ckpt, num_heads=2, **kwargs):
    meta = ckpt['meta']['backbone']
    model = DINOv2(arch=dict(embed_dims=meta['embed_dims'], num_layers=meta['num_layers'],
                             num_heads=num_heads,
                             feedforward_channels=meta['feedforward_channels'],
                             ffn_type=meta['ffn_type']),
                   img_size=tuple(meta['img_size']), patch_size=meta['patch_size'],
                   num_register_tokens=meta['num_register_tokens'], out_type='raw', **kwargs)
    sd = {k[len('backbone.'):]: v for k, v in ckpt['state_dict'].items()
          if k.startswith('backbone.')}
    model.load_state_dict(sd, strict=True)
    model.eval()  # mmpretrain's BaseBackbone.train() returns None
    return model


# ------------------------------------------------------------------------- resampling maths
@pytest.mark.parametrize('old,new', [(14, 16), (16, 14), (14, 14)])
def test_patch_kernel_resample_equals_timm(old, new):
    w = torch.randn(8, 3, old, old)
    torch.testing.assert_close(resample_patch_kernel(w, new), resample_patch_embed(w, [new, new]),
                               atol=1e-5, rtol=1e-5)


def test_patch_kernel_resample_preserves_patch_response():
    # FlexiViT property: <resize(x), w'> == <x, w> for patches (exact when upsampling).
    w = torch.randn(4, 3, 14, 14)
    x = torch.randn(5, 3, 14, 14)
    w16 = resample_patch_kernel(w, 16)
    x16 = torch.nn.functional.interpolate(x, size=(16, 16), mode='bicubic', antialias=True,
                                          align_corners=False)
    torch.testing.assert_close(torch.einsum('bchw,ochw->bo', x16, w16),
                               torch.einsum('bchw,ochw->bo', x, w), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize('src,dst', [((4, 4), (6, 5)), ((6, 6), (3, 4)), ((5, 5), (5, 5))])
def test_pos_embed_resize_equals_timm(src, dst):
    pos = torch.randn(1, src[0] * src[1], D)
    ref = resample_abs_pos_embed(pos, new_size=list(dst), old_size=list(src), num_prefix_tokens=0)
    torch.testing.assert_close(resize_pos_embed_grid(pos, src, dst), ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- timm format
@pytest.mark.parametrize('name', ['src.pth', 'model.safetensors'])
def test_timm_roundtrip_equal_outputs(tmp_path, name):
    src_model = _timm_vit()
    ckpt = _convert(tmp_path, src_model.state_dict(), 'timm', name=name)
    assert ckpt['meta']['backbone']['pos_embed_grid'] == [4, 4]
    ours = _backbone(ckpt)
    x = torch.randn(2, 3, 70, 42)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], src_model.forward_features(x), atol=1e-5, rtol=0)


def test_timm_patch16_matches_timm_own_loading(tmp_path):
    """--patch-size 16 --img-size 64 == timm loading the p14 weights into a p16 model (EoMT ref)."""
    src_model = _timm_vit(patch=14, grid=4)
    ckpt = _convert(tmp_path, src_model.state_dict(), 'timm', '--patch-size', '16',
                    '--img-size', '64')
    meta = ckpt['meta']['backbone']
    assert (meta['patch_size'], meta['source_patch_size']) == (16, 14)
    assert meta['pos_embed_grid'] == [4, 4]
    ref_model = _timm_vit(patch=16, grid=4)
    ref_model.load_state_dict(checkpoint_filter_fn(src_model.state_dict(), ref_model))
    torch.testing.assert_close(ckpt['state_dict']['backbone.patch_embed.projection.weight'],
                               ref_model.patch_embed.proj.weight, atol=1e-5, rtol=1e-5)
    ours = _backbone(ckpt)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref_model.forward_features(x), atol=1e-5, rtol=0)
    # ... and the grid resize is real: convert to 80 px -> 5x5 grid like timm at img_size 80.
    ckpt80 = _convert(tmp_path, src_model.state_dict(), 'timm', '--patch-size', '16',
                      '--img-size', '80')
    ref80 = _timm_vit(patch=16, grid=5)
    ref80.load_state_dict(checkpoint_filter_fn(src_model.state_dict(), ref80))
    torch.testing.assert_close(ckpt80['state_dict']['backbone.pos_embed'], ref80.pos_embed,
                               atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- Meta format
def _meta_from_timm(model, swiglu=False):
    """Meta hub layout built from a timm model (the inverse of ``_convert_dinov2`` in
    timm/models/vision_transformer.py)."""
    sd = dict(model.state_dict())
    pos_cls = torch.randn(1, 1, D) * 0.2
    out = {'cls_token': sd.pop('cls_token') - pos_cls,  # Meta keeps the CLS position separate
           'pos_embed': torch.cat([pos_cls, sd.pop('pos_embed')], dim=1),
           'register_tokens': sd.pop('reg_token'),
           'mask_token': torch.randn(1, D)}
    for k, v in sd.items():
        if swiglu:
            k = k.replace('mlp.fc1.', 'mlp.w12.').replace('mlp.fc2.', 'mlp.w3.')
        out[k] = v
    return out


def test_meta_dinov2_equal_outputs(tmp_path):
    src_model = _timm_vit()
    ckpt = _convert(tmp_path, _meta_from_timm(src_model), 'meta-dinov2')
    ours = _backbone(ckpt)
    x = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], src_model.forward_features(x), atol=1e-5, rtol=0)


def test_meta_dinov2_giant_swiglu(tmp_path):
    from timm.layers import SwiGLUPacked
    # fc1 32 -> 128 packed = SwiGLU hidden 64 (a multiple of 8, like giant's 4096)
    src_model = _timm_vit(mlp_ratio=4.0, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    ckpt = _convert(tmp_path, _meta_from_timm(src_model, swiglu=True), 'meta-dinov2')
    assert ckpt['meta']['backbone']['ffn_type'] == 'swiglu_fused'
    assert 'backbone.layers.1.ffn.w12.weight' in ckpt['state_dict']
    ours = _backbone(ckpt)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], src_model.forward_features(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------- refusing bad checkpoints
def test_wrong_arch_refused(tmp_path, capsys):
    src = tmp_path / 'src.pth'
    torch.save(_timm_vit().state_dict(), src)
    rc = convert_weights.main([str(src), str(tmp_path / 'dst.pth'), '--format', 'timm',
                               '--arch', 'b'])
    assert rc == 1
    err = capsys.readouterr().err
    assert 'is not DINOv2-b' in err and "'embed_dims': 32" in err
    assert not (tmp_path / 'dst.pth').exists()


def test_missing_unexpected_and_bad_shapes_refused():
    sd = _timm_vit().state_dict()
    broken = {k: v for k, v in sd.items() if k != 'blocks.1.attn.proj.weight'}
    with pytest.raises(CheckpointConversionError,
                       match=r"missing: \['layers.1.attn.proj.weight'\]"):
        convert_state_dict(broken, 'timm')
    with pytest.raises(CheckpointConversionError, match='unexpected backbone keys.*head.weight'):
        convert_state_dict(dict(sd, **{'head.weight': torch.zeros(10, D)}), 'timm')
    bad = dict(sd, **{'blocks.0.norm2.weight': torch.zeros(D + 1)})
    with pytest.raises(CheckpointConversionError, match='bad shapes.*layers.0.ln2.weight'):
        convert_state_dict(bad, 'timm')
    with pytest.raises(CheckpointConversionError, match='use --format meta-dinov2'):
        convert_state_dict(_meta_from_timm(_timm_vit()), 'timm')
    with pytest.raises(CheckpointConversionError, match="no 'network.' keys"):
        convert_state_dict(sd, 'eomt')
    with pytest.raises(CheckpointConversionError, match='unknown format'):
        convert_state_dict(sd, 'detectron')


def test_converted_checkpoint_refused_by_other_arch(tmp_path):
    ckpt = _convert(tmp_path, _timm_vit().state_dict(), 'timm')
    sd = {k[len('backbone.'):]: v for k, v in ckpt['state_dict'].items()}
    model = DINOv2(arch=dict(embed_dims=D, num_layers=3, num_heads=2, feedforward_channels=128),
                   img_size=56, patch_size=14)
    with pytest.raises(ValueError, match='checkpoint has layers 0..1 .2., this model has 3'):
        model.load_state_dict(sd, strict=False)


def test_unsafe_pickle_refused(tmp_path):
    src = tmp_path / 'lightning.ckpt'
    torch.save({'state_dict': _timm_vit().state_dict(),
                'hyper_parameters': argparse.Namespace(lr=1e-4)}, src)
    with pytest.raises(CheckpointConversionError, match='weights_only=True'):
        convert_weights.convert_file(str(src), str(tmp_path / 'dst.pth'), 'timm')


# -------------------------------------------------------------------- EoMT (official) format
def _official_eomt(src_model, num_q=5, num_classes=3, num_blocks=1, patch=16):
    def randn(*shape):  # small, so the reference comparison stays O(1)
        return torch.randn(*shape) * 0.2

    sd = {'network.encoder.backbone.' + k: v for k, v in src_model.state_dict().items()}
    sd['network.encoder.pixel_mean'] = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    sd['network.encoder.pixel_std'] = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    sd['network.q.weight'] = randn(num_q, D)
    sd['network.class_head.weight'] = randn(num_classes + 1, D)
    sd['network.class_head.bias'] = randn(num_classes + 1)
    for i in (0, 2, 4):
        sd[f'network.mask_head.{i}.weight'] = randn(D, D)
        sd[f'network.mask_head.{i}.bias'] = randn(D)
    for i in range(2 if patch == 16 else 1):
        sd[f'network.upscale.{i}.conv1.weight'] = randn(D, D, 2, 2)
        sd[f'network.upscale.{i}.conv1.bias'] = randn(D)
        sd[f'network.upscale.{i}.conv2.weight'] = randn(D, 1, 3, 3)
        sd[f'network.upscale.{i}.norm.weight'] = randn(D)
        sd[f'network.upscale.{i}.norm.bias'] = randn(D)
    sd['network.attn_mask_probs'] = torch.zeros(num_blocks)
    sd['criterion.empty_weight'] = torch.ones(num_classes + 1)
    return {'state_dict': sd, 'epoch': 3, 'global_step': 120}


def test_eomt_official_checkpoint(tmp_path, capsys):
    src_model = _timm_vit(patch=16, grid=2)
    src = _official_eomt(src_model)
    ckpt = _convert(tmp_path, src, 'eomt')
    printed = capsys.readouterr().out
    assert 'q.weight -> decoder.q.weight' in printed
    assert 'criterion.empty_weight: loss buffer' in printed
    assert ckpt['meta']['decoder'] == dict(num_queries=5, num_classes=3, num_blocks=1,
                                           num_upscale=2)
    ours = _backbone(ckpt)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], src_model.forward_features(x), atol=1e-5, rtol=0)
    # Every decoder tensor arrives unchanged under the table's name; nothing else is added.
    decoder = {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('backbone.')}
    for key, value in src['state_dict'].items():
        canon = key[len('network.'):]
        if key.startswith('network.encoder') or key.startswith('criterion'):
            continue
        target = next(re.sub(f'^{p}$', t, canon) for p, t in DECODER_KEY_MAP
                      if re.fullmatch(p, canon))
        torch.testing.assert_close(decoder.pop(target), value, atol=0, rtol=0)
    assert not decoder


def test_eomt_bad_decoder_and_patch_change_refused():
    src = _official_eomt(_timm_vit(patch=16, grid=2))['state_dict']
    with pytest.raises(CheckpointConversionError, match='cannot change the patch size'):
        convert_state_dict(src, 'eomt', patch_size=14)
    broken = dict(src)
    del broken['network.upscale.1.conv2.weight']
    with pytest.raises(CheckpointConversionError, match='upscale.1.conv2.weight'):
        convert_state_dict(broken, 'eomt')
    wrong = dict(src, **{'network.mask_head.2.weight': torch.randn(D, D + 1)})
    with pytest.raises(CheckpointConversionError, match='mask_head.2.weight'):
        convert_state_dict(wrong, 'eomt')
    odd_mean = dict(src, **{'network.encoder.pixel_mean': torch.zeros(1, 3, 1, 1)})
    with pytest.raises(CheckpointConversionError, match='differs from ImageNet'):
        convert_state_dict(odd_mean, 'eomt')


# ------------------------------------------------------------------ Hugging Face EoMT format
def _hf_model(swiglu=False):
    transformers = pytest.importorskip('transformers')
    config = transformers.EomtConfig(
        hidden_size=D, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=4, image_size=32,
        patch_size=16, num_upscale_blocks=2, num_blocks=1, num_queries=5, num_labels=3,
        num_register_tokens=4, use_swiglu_ffn=swiglu, layerscale_value=1.0)
    model = transformers.EomtForUniversalSegmentation(config)
    _randomize(model)
    model.attn_mask_probs.zero_()  # inference without masked attention, like ours
    return model.eval()


def _hf_backbone_tokens(model, x):
    """Run the HF model's own modules as a plain ViT (no queries): embeddings, layers, layernorm."""
    h = model.embeddings(x)
    for layer in model.layers:
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
    return model.layernorm(h)


@pytest.mark.parametrize('swiglu', [False, True])
def test_hf_eomt_checkpoint(tmp_path, swiglu):
    model = _hf_model(swiglu)
    ckpt = _convert(tmp_path, model.state_dict(), 'hf-eomt', name='model.safetensors')
    assert ckpt['meta']['decoder'] == dict(num_queries=5, num_classes=3, num_blocks=1,
                                           num_upscale=2)
    assert ckpt['meta']['backbone']['ffn_type'] == ('swiglu_fused' if swiglu else 'origin')
    ours = _backbone(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], _hf_backbone_tokens(model, x), atol=1e-5, rtol=0)
    sd = ckpt['state_dict']
    dec = dict(DECODER_KEY_MAP)
    torch.testing.assert_close(sd[dec[r'q\.weight']], model.query.weight)
    torch.testing.assert_close(sd['decoder.mask_head.4.bias'], model.mask_head.fc3.bias)
    torch.testing.assert_close(sd['decoder.upscale.1.norm.weight'],
                               model.upscale_block.block[1].layernorm2d.weight)


# ------------------------------------------------------------- full EoMT model from the files
def _eomt_model(ckpt, num_heads=2):
    from mmseg.registry import MODELS
    bb, dec = ckpt['meta']['backbone'], ckpt['meta']['decoder']
    model = MODELS.build(dict(
        type='EoMT',
        backbone=dict(type='DINOv2', arch=dict(embed_dims=bb['embed_dims'],
                                               num_layers=bb['num_layers'], num_heads=num_heads,
                                               feedforward_channels=bb['feedforward_channels'],
                                               ffn_type=bb['ffn_type']),
                      img_size=tuple(bb['img_size']), patch_size=bb['patch_size'],
                      num_register_tokens=bb['num_register_tokens']),
        decoder=dict(type='EoMTDecoder', num_classes=dec['num_classes'],
                     num_queries=dec['num_queries'], num_blocks=dec['num_blocks'])))
    model.load_state_dict(ckpt['state_dict'], strict=True)
    model.eval()
    return model


@pytest.mark.parametrize('swiglu', [False, True])
def test_hf_eomt_full_model_equal_outputs(tmp_path, swiglu):
    hf = _hf_model(swiglu)
    ckpt = _convert(tmp_path, hf.state_dict(), 'hf-eomt', name='model.safetensors')
    ours = _eomt_model(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        mask_logits, class_logits = ours.forward_logits(x)
    torch.testing.assert_close(class_logits, ref.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mask_logits, ref.masks_queries_logits, atol=1e-4, rtol=1e-4)
    assert mask_logits.shape == (2, 5, 8, 8)


def _reference_eomt(timm_model, dec, x, num_blocks=1):
    """Plain statement of EoMT inference: timm ViT blocks with queries before the last blocks."""
    f = torch.nn.functional
    t = timm_model._pos_embed(timm_model.patch_embed(x))
    blocks = list(timm_model.blocks)
    for blk in blocks[:len(blocks) - num_blocks]:
        t = blk(t)
    q = dec['q.weight'][None].expand(x.shape[0], -1, -1)
    t = torch.cat([q, t], dim=1)
    for blk in blocks[len(blocks) - num_blocks:]:
        t = blk(t)
    t = timm_model.norm(t)
    nq = q.shape[1]
    queries, patches = t[:, :nq], t[:, nq + timm_model.num_prefix_tokens:]
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    feat = patches.transpose(1, 2).reshape(x.shape[0], D, h, w)
    for i in range(2):
        feat = f.gelu(f.conv_transpose2d(feat, dec[f'upscale.{i}.conv1.weight'],
                                         dec[f'upscale.{i}.conv1.bias'], stride=2))
        feat = f.conv2d(feat, dec[f'upscale.{i}.conv2.weight'], padding=1, groups=D)
        feat = f.layer_norm(feat.permute(0, 2, 3, 1), (D,), dec[f'upscale.{i}.norm.weight'],
                            dec[f'upscale.{i}.norm.bias'], eps=1e-6).permute(0, 3, 1, 2)
    m = queries
    for i in (0, 2, 4):
        m = f.linear(m, dec[f'mask_head.{i}.weight'], dec[f'mask_head.{i}.bias'])
        m = f.gelu(m) if i < 4 else m
    cls = f.linear(queries, dec['class_head.weight'], dec['class_head.bias'])
    return torch.einsum('bqc,bchw->bqhw', m, feat), cls


def test_eomt_official_full_model_equal_reference(tmp_path):
    timm_model = VisionTransformer(img_size=32, patch_size=16, embed_dim=D, depth=3, num_heads=2,
                                   reg_tokens=4, no_embed_class=True, init_values=1e-5,
                                   num_classes=0)
    _randomize(timm_model)
    timm_model.eval()
    src = _official_eomt(timm_model)
    ckpt = _convert(tmp_path, src, 'eomt')
    ours = _eomt_model(ckpt)
    dec = {k[len('network.'):]: v for k, v in src['state_dict'].items()
           if k.startswith('network.') and 'encoder' not in k}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_masks, ref_cls = _reference_eomt(timm_model, dec, x)
        mask_logits, class_logits = ours.forward_logits(x)
    assert ref_masks.abs().mean() > 0.1
    torch.testing.assert_close(class_logits, ref_cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mask_logits, ref_masks, atol=1e-4, rtol=1e-4)


def test_init_cfg_pretrained_loads_converted_file(tmp_path):
    """The documented way to start from converted weights: init_cfg Pretrained, prefix backbone."""
    src_model = _timm_vit(patch=14, grid=4)
    ckpt = _convert(tmp_path, src_model.state_dict(), 'timm')  # keeps patch 14, 4x4 grid
    path = str(tmp_path / 'converted' / 'dst.pth')
    arch = dict(embed_dims=D, num_layers=2, num_heads=2, feedforward_channels=128)
    same = DINOv2(arch=arch, img_size=56, patch_size=14, out_type='raw',
                  init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    same.init_weights()
    same.eval()
    x = torch.randn(1, 3, 56, 42)
    with torch.no_grad():
        torch.testing.assert_close(same(x)[0], src_model.forward_features(x), atol=1e-5, rtol=0)
    # Into an EoMT-style p16 / 80 px backbone: kernel resampled and grid resized while loading,
    # exactly as converting with --patch-size 16 --img-size 80 would have done.
    p16 = DINOv2(arch=arch, img_size=80, patch_size=16,
                 init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    p16.init_weights()
    ckpt16 = _convert(tmp_path, src_model.state_dict(), 'timm', '--patch-size', '16',
                      '--img-size', '80')
    for key, value in ckpt16['state_dict'].items():
        torch.testing.assert_close(p16.state_dict()[key[len('backbone.'):]], value,
                                   atol=1e-6, rtol=0)
    # A file for another architecture is refused, not half-loaded with a warning.
    deeper = DINOv2(arch=dict(arch, num_layers=3), img_size=56, patch_size=14,
                    init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    with pytest.raises(ValueError, match='this model has 3'):
        deeper.init_weights()


@pytest.mark.parametrize('timm_name,arch', [('vit_small_patch14_reg4_dinov2', 's'),
                                            ('vit_base_patch14_reg4_dinov2', 'b'),
                                            ('vit_large_patch14_reg4_dinov2', 'l'),
                                            ('vit_giant_patch14_reg4_dinov2', 'g')])
def test_real_size_archs_fit_presets(timm_name, arch):
    """Full-size timm DINOv2 reg4 layouts (on the meta device: shapes only) fit our presets."""
    with torch.device('meta'):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    sd, meta, _ = convert_state_dict(dict(model.state_dict()), 'timm', arch=arch)
    assert meta['backbone']['pos_embed_grid'] == [37, 37]
    assert meta['backbone']['num_heads'] == DINOv2.arch_zoo[arch]['num_heads']
    with torch.device('meta'):
        ours = DINOv2(arch=arch, img_size=518, patch_size=14)
    expected = {'backbone.' + k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
