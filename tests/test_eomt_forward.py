"""EoMT forward pass against a plain, test-local statement of the reference equations."""
import math

import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

EMBED, DEPTH, HEADS, L2, QUERIES, CLASSES, REGISTERS = 32, 4, 2, 2, 8, 4, 4


def build_eomt(patch_size=16, img_size=64, num_blocks=L2, test_cfg=None, model_type='EoMT',
               **decoder_kw):
    cfg = dict(
        type=model_type,
        backbone=dict(
            type='DINOv2',
            arch=dict(embed_dims=EMBED, num_layers=DEPTH, num_heads=HEADS,
                      feedforward_channels=4 * EMBED),
            img_size=img_size, patch_size=patch_size, num_register_tokens=REGISTERS),
        decoder=dict(type='EoMTDecoder', num_classes=CLASSES, num_queries=QUERIES,
                     num_blocks=num_blocks, num_points=64, **decoder_kw),
        test_cfg=test_cfg)
    model = MODELS.build(cfg)
    # Random weights of a healthy scale everywhere (layer scale 1e-5 and zero tokens would make
    # the comparison blind to most of the network).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'gamma' in name:
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith('norm.weight') or ('.ln' in name and name.endswith('weight')):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


# ----------------------------------------------------------------- plain equations
def plain_layer_norm(x, mod):
    return F.layer_norm(x, (x.shape[-1], ), mod.weight, mod.bias, mod.eps)


def plain_block(layer, x, mask):
    """x + g1 * proj(MHA(LN1 x)) ; x + g2 * fc2(gelu(fc1(LN2 x))) with a bool mask."""
    b, n, d = x.shape
    heads = layer.attn.num_heads
    hd = d // heads
    h = plain_layer_norm(x, layer.ln1)
    qkv = h @ layer.attn.qkv.weight.T + layer.attn.qkv.bias
    q, k, v = qkv.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], float('-inf'))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    out = out @ layer.attn.proj.weight.T + layer.attn.proj.bias
    x = x + layer.attn.gamma1.weight * out
    h = plain_layer_norm(x, layer.ln2)
    fc1, fc2 = layer.ffn.layers[0][0], layer.ffn.layers[1]
    h = F.gelu(h @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    return x + layer.ffn.gamma2.weight * h


def plain_embed(backbone, img):
    p = backbone.patch_size
    t = F.conv2d(img, backbone.patch_embed.projection.weight,
                 backbone.patch_embed.projection.bias, stride=p)
    b, d, h, w = t.shape
    t = t.flatten(2).transpose(1, 2) + backbone.pos_embed
    prefix = [backbone.cls_token.expand(b, -1, -1),
              backbone.register_tokens.expand(b, -1, -1)]
    return torch.cat(prefix + [t], 1), (h, w)


def plain_predict(dec, tokens, hw, num_prefix):
    q = tokens[:, :dec.num_queries]
    class_logits = q @ dec.class_head.weight.T + dec.class_head.bias
    m = q
    for i, lin in enumerate((dec.mask_head[0], dec.mask_head[2], dec.mask_head[4])):
        m = m @ lin.weight.T + lin.bias
        if i < 2:
            m = F.gelu(m)
    g = tokens[:, dec.num_queries + num_prefix:].transpose(1, 2).reshape(
        tokens.shape[0], -1, *hw)
    for blk in dec.upscale:
        g = F.conv_transpose2d(g, blk.conv1.weight, blk.conv1.bias, stride=2)
        g = F.gelu(g)
        g = F.conv2d(g, blk.conv2.weight, None, padding=1, groups=g.shape[1])
        g = F.layer_norm(g.permute(0, 2, 3, 1), (g.shape[1], ), blk.norm.weight,
                         blk.norm.bias, 1e-6).permute(0, 3, 1, 2)
    return torch.einsum('bqc,bchw->bqhw', m, g), class_logits


def plain_eomt(model, img, probs=None):
    """The reference equations; probs=None: no masked attention (inference)."""
    bb, dec = model.backbone, model.decoder
    npre = 1 + REGISTERS
    x, hw = plain_embed(bb, img)
    final_norm = lambda t: plain_layer_norm(t, bb.ln1)  # noqa: E731
    preds = []
    for i in range(DEPTH):
        j = i - (DEPTH - dec.num_blocks)
        if j == 0:
            x = torch.cat([dec.q.weight[None].expand(x.shape[0], -1, -1), x], 1)
        mask = None
        if j >= 0 and probs is not None:
            ml, cl = plain_predict(dec, final_norm(x), hw, npre)
            preds.append((ml, cl))
            n = x.shape[1]
            mask = torch.ones(x.shape[0], n, n, dtype=torch.bool)
            small = F.interpolate(ml, size=hw, mode='bilinear', align_corners=False)
            allowed = small.flatten(2) > 0
            if probs[j] < 1:
                full = torch.rand(x.shape[0], dec.num_queries) > probs[j]
                allowed[full] = True
            mask[:, :dec.num_queries, dec.num_queries + npre:] = allowed
        x = plain_block(bb.layers[i], x, mask)
    preds.append(plain_predict(dec, final_norm(x), hw, npre))
    return preds


# ------------------------------------------------------------------------- tests
@pytest.fixture
def model():
    return build_eomt()


def test_inference_matches_plain_equations(model):
    img = torch.randn(2, 3, 64, 64)
    model.eval()
    # Masked attention must be off at inference whatever the keep probabilities are.
    model.decoder.attn_mask_probs.fill_(1.0)
    with torch.no_grad():
        masks, classes = model.run_network(img, masked_attn=False)
        ml, cl = model.forward_logits(img)
        (exp_m, exp_c), = plain_eomt(model, img, probs=None)
        tensor_mode = model(img, mode='tensor')
    assert len(masks) == 1 and masks[0].shape == (2, QUERIES, 16, 16)
    assert classes[0].shape == (2, QUERIES, CLASSES + 1)
    torch.testing.assert_close(ml, exp_m, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl, exp_c, rtol=1e-4, atol=1e-5)
    assert len(tensor_mode[0]) == 1
    torch.testing.assert_close(tensor_mode[0][0], exp_m, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('probs', [(1.0, 1.0), (0.0, 0.0), (0.3, 0.7)])
def test_masked_attention_matches_plain_equations(model, probs):
    img = torch.randn(2, 3, 64, 64)
    model.train()
    model.decoder.attn_mask_probs.copy_(torch.tensor(probs))
    torch.manual_seed(123)
    with torch.no_grad():
        masks, classes = model.run_network(img, masked_attn=True)
    torch.manual_seed(123)
    with torch.no_grad():
        expected = plain_eomt(model, img, probs=probs)
    # Deep supervision: L2 intermediate predictions + the final one.
    assert len(masks) == len(classes) == L2 + 1
    for (m, c), (em, ec) in zip(zip(masks, classes), expected):
        torch.testing.assert_close(m, em, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, ec, rtol=1e-4, atol=1e-5)


def test_masks_change_the_output_and_random_keep_is_seeded(model):
    img = torch.randn(2, 3, 64, 64)
    model.train()
    outs = {}
    for probs in [(1.0, 1.0), (0.0, 0.0)]:
        model.decoder.attn_mask_probs.copy_(torch.tensor(probs))
        with torch.no_grad():
            outs[probs] = model.run_network(img, masked_attn=True)[0][-1]
    # The masks are not a no-op on this input ...
    assert (outs[(1.0, 1.0)] - outs[(0.0, 0.0)]).abs().max() > 1e-3
    # ... and the first intermediate prediction does not depend on any mask.
    model.decoder.attn_mask_probs.copy_(torch.tensor([0.5, 0.5]))
    with torch.no_grad():
        torch.manual_seed(5)
        a = model.run_network(img, masked_attn=True)[0][-1]
        torch.manual_seed(5)
        b = model.run_network(img, masked_attn=True)[0][-1]
        torch.manual_seed(6)
        c = model.run_network(img, masked_attn=True)[0][-1]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_attn_mask_structure(model):
    dec = model.decoder
    dec.attn_mask_probs.copy_(torch.tensor([1.0, 0.0]))
    ml = torch.randn(1, QUERIES, 8, 8)
    mask = dec.build_attn_mask(ml, (2, 2), 5, 0)
    n = QUERIES + 5 + 4
    assert mask.shape == (1, 1, n, n) and mask.dtype == torch.bool
    m = mask[0, 0]
    assert m[:, :QUERIES + 5].all()  # everybody sees queries, CLS and registers
    assert m[QUERIES:].all()  # prefix and patch tokens are never masked
    expected = F.interpolate(ml, size=(2, 2), mode='bilinear', align_corners=False) > 0
    assert torch.equal(m[:QUERIES, QUERIES + 5:], expected.flatten(2)[0])
    assert dec.build_attn_mask(ml, (2, 2), 5, 1) is None  # p = 0: no mask at all
    with pytest.raises(IndexError):
        dec.build_attn_mask(ml, (2, 2), 5, 2)


def test_eval_loss_mode_counts_and_train_predictions(model):
    img = torch.randn(2, 3, 64, 64)
    model.train()
    preds = model(img, mode='tensor')
    assert len(preds[0]) == L2 + 1
    model.decoder.masked_attn_enabled = False
    assert len(model(img, mode='tensor')[0]) == 1


def test_patch8_upscaler_and_quarter_resolution():
    model = build_eomt(patch_size=8, img_size=32)
    assert len(model.decoder.upscale) == 1
    model.eval()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ml, cl = model.forward_logits(img)
        (em, ec), = plain_eomt(model, img)
    assert ml.shape[-2:] == (8, 8)
    torch.testing.assert_close(ml, em, rtol=1e-4, atol=1e-5)


def _sample(h, w, **meta):
    s = SegDataSample()
    s.set_metainfo(dict(ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w), **meta))
    return s


def plain_scores(model, img):
    (m, c), = plain_eomt(model, img)
    m = F.interpolate(m, size=img.shape[-2:], mode='bilinear', align_corners=False)
    return torch.einsum('bqk,bqhw->bkhw', c.softmax(-1)[..., :-1], m.sigmoid())


def test_predict_whole_outputs(model):
    model.eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        samples = model.predict(img, [_sample(64, 64), _sample(64, 64)])
        expected = plain_scores(model, img)
    for i, s in enumerate(samples):
        assert isinstance(s.seg_logits, PixelData) and s.seg_logits.data.shape == (CLASSES, 64, 64)
        torch.testing.assert_close(s.seg_logits.data, expected[i], rtol=1e-4, atol=1e-5)
        assert torch.equal(s.pred_sem_seg.data, expected[i].argmax(0, keepdim=True))
        # S_k = sum_q P(k | q) * sigmoid(m_q): non-negative, at most Q.
        assert s.seg_logits.data.min() >= 0 and s.seg_logits.data.max() <= QUERIES


def test_predict_removes_padding_flip_and_resizes(model):
    model.eval()
    img = torch.randn(1, 3, 64, 64)
    sample = _sample(30, 40, padding_size=[0, 16, 0, 24], flip=True,
                     flip_direction='horizontal')
    with torch.no_grad():
        out = model.predict(img, [sample])[0]
        expected = plain_scores(model, img)[:, :, :40, :48].flip(-1)
        expected = F.interpolate(expected, size=(30, 40), mode='bilinear', align_corners=False)[0]
    assert out.seg_logits.data.shape == (CLASSES, 30, 40)
    torch.testing.assert_close(out.seg_logits.data, expected, rtol=1e-4, atol=1e-5)


def test_slide_single_crop_equals_whole():
    whole = build_eomt(test_cfg=dict(mode='whole'))
    slide = build_eomt(test_cfg=dict(mode='slide', crop_size=64))
    slide.load_state_dict(whole.state_dict())
    whole.eval(), slide.eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = whole.predict(img, [_sample(64, 64), _sample(64, 64)])
        b = slide.predict(img, [_sample(64, 64), _sample(64, 64)])
    for x, y in zip(a, b):
        torch.testing.assert_close(x.seg_logits.data, y.seg_logits.data)


@pytest.mark.parametrize('shape', [(64, 160), (160, 64)])
def test_slide_reference_window_placement(shape):
    model = build_eomt(test_cfg=dict(mode='slide', crop_size=64))
    model.eval()
    h, w = shape
    img = torch.randn(1, 3, h, w)
    # Short side already equals the crop: ceil(160 / 64) = 3 windows at 0, 48, 96 (overlap
    # 192 - 160 = 32 spread as 16 per gap), overlaps averaged.
    with torch.no_grad():
        got = model.encode_decode(img, [dict()])
        total = torch.zeros(1, CLASSES, h, w)
        count = torch.zeros(1, 1, h, w)
        for s in (0, 48, 96):
            if h > w:
                total[:, :, s:s + 64] += plain_scores(model, img[:, :, s:s + 64])
                count[:, :, s:s + 64] += 1
            else:
                total[..., s:s + 64] += plain_scores(model, img[..., s:s + 64])
                count[..., s:s + 64] += 1
    assert count.min() == 1 and count.max() == 2
    torch.testing.assert_close(got, total / count, rtol=1e-4, atol=1e-5)


def test_slide_resizes_short_side_to_crop():
    model = build_eomt(test_cfg=dict(mode='slide', crop_size=64))
    model.eval()
    img = torch.randn(1, 3, 32, 64)  # -> 64 x 128: two windows at 0 and 64
    with torch.no_grad():
        got = model.encode_decode(img, [dict()])
        big = F.interpolate(img, size=(64, 128), mode='bilinear', align_corners=False,
                            antialias=True)
        stitched = torch.cat([plain_scores(model, big[..., :64]),
                              plain_scores(model, big[..., 64:])], -1)
        expected = F.interpolate(stitched, size=(32, 64), mode='bilinear', align_corners=False)
    assert got.shape == (1, CLASSES, 32, 64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match='num_blocks=5 is larger than the backbone depth'):
        build_eomt(num_blocks=5)
    model = build_eomt()
    model.eval()
    with pytest.raises(ValueError, match='not a multiple of the patch size 16'):
        model.predict(torch.randn(1, 3, 60, 64), [_sample(60, 64)])
    with pytest.raises(ValueError, match='square windows'):
        build_eomt(test_cfg=dict(mode='slide', crop_size=(64, 32)))
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        build_eomt(test_cfg=dict(mode='sliding'))
    with pytest.raises(ValueError, match='does not match the backbone embed_dims'):
        build_eomt(embed_dims=48)


def test_num_blocks_equal_depth_allowed():
    model = build_eomt(num_blocks=DEPTH)
    model.train()
    img = torch.randn(1, 3, 64, 64)
    model.decoder.attn_mask_probs.fill_(1.0)
    with torch.no_grad():
        masks, _ = model.run_network(img, masked_attn=True)
        expected = plain_eomt(model, img, probs=[1.0] * DEPTH)
    assert len(masks) == DEPTH + 1
    torch.testing.assert_close(masks[-1], expected[-1][0], rtol=1e-4, atol=1e-5)


def test_no_normalisation_inside_the_model(model):
    """The model must not rescale or normalise pixels itself (the preprocessor does it once)."""
    model.eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model.forward_logits(img)[0]
        b = model.forward_logits(img * 2 + 1)[0]
        (expected_b, _), = plain_eomt(model, img * 2 + 1)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, expected_b, rtol=1e-4, atol=1e-5)


def test_anomaly_scores_whole_mode_at_label_resolution():
    model = build_eomt(model_type='AnomalyEoMT', test_cfg=dict(mode='whole', anomaly_scores=['msp', 'maxlogit']))
    model.eval()
    img = torch.randn(1, 3, 64, 64)
    sample = _sample(40, 50, padding_size=[0, 14, 0, 8])  # content 56 x 50 -> label 40 x 50
    with torch.no_grad():
        out = model.predict(img, [sample])[0]
        (m, c), = plain_eomt(model, img)
        m = F.interpolate(m, size=(64, 64), mode='bilinear', align_corners=False)[..., :56, :50]
        m = F.interpolate(m, size=(40, 50), mode='bilinear', align_corners=False)
        sig = m.sigmoid()
        s = torch.einsum('bqk,bqhw->bkhw', c.softmax(-1)[..., :-1], sig)
        lk = torch.einsum('bqk,bqhw->bkhw', c[..., :-1], sig)
    assert set(out.anomaly_scores.keys()) == {'msp', 'maxlogit'}
    assert out.anomaly_scores.msp.shape == (1, 40, 50)
    assert out.anomaly_scores.msp.dtype == torch.float32
    torch.testing.assert_close(out.anomaly_scores.msp, 1 - s.amax(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.anomaly_scores.maxlogit, -lk.amax(1), rtol=1e-4, atol=1e-5)
    assert out.seg_logits.data.shape == (CLASSES, 40, 50)


def test_anomaly_scores_slide_mode_are_stitched():
    cfg = dict(anomaly_scores=['msp'])
    whole = build_eomt(model_type='AnomalyEoMT', test_cfg=dict(mode='whole', **cfg))
    slide = build_eomt(model_type='AnomalyEoMT',
                       test_cfg=dict(mode='slide', crop_size=64, **cfg))
    slide.load_state_dict(whole.state_dict())
    whole.eval(), slide.eval()
    with torch.no_grad():
        img = torch.randn(1, 3, 64, 64)
        a = whole.predict(img, [_sample(64, 64)])[0].anomaly_scores.msp
        b = slide.predict(img, [_sample(64, 64)])[0].anomaly_scores.msp
        torch.testing.assert_close(a, b)
        wide = torch.randn(1, 3, 64, 128)
        got = slide.predict(wide, [_sample(64, 128)])[0].anomaly_scores.msp
        halves = [1 - plain_scores(slide, wide[..., s:s + 64]).amax(1) for s in (0, 64)]
    torch.testing.assert_close(got, torch.cat(halves, -1), rtol=1e-4, atol=1e-5)


def test_mmseg_tta_consumes_outputs(model):
    from mmseg.models import SegTTAModel

    model.eval()
    tta = SegTTAModel(module=model)
    img = torch.randn(1, 3, 64, 64)
    plain = _sample(64, 64, img_path='x.png')
    flipped = _sample(64, 64, img_path='x.png', flip=True, flip_direction='horizontal')
    with torch.no_grad():
        out = tta.test_step(dict(inputs=[img, img.flip(-1)], data_samples=[[plain], [flipped]]))
        s = plain_scores(model, img)[0]
        s_flip = plain_scores(model, img.flip(-1))[0].flip(-1)
    expected = (s.softmax(0) + s_flip.softmax(0)).argmax(0)
    assert torch.equal(out[0].pred_sem_seg.data, expected[None])


def test_lora_config_freezes_backbone_only_and_starts_at_base_outputs():
    base = build_eomt()
    lora_cfg = dict(enabled=True, rank=4, lora_alpha=8, lora_dropout=0.0,
                    target_modules=['qkv', 'proj', 'fc1', 'fc2'], freeze_base_model=True)
    lora = MODELS.build(dict(
        type='EoMT',
        backbone=dict(type='DINOv2', arch=dict(embed_dims=EMBED, num_layers=DEPTH, num_heads=HEADS,
                                               feedforward_channels=4 * EMBED),
                      img_size=64, patch_size=16, num_register_tokens=REGISTERS),
        decoder=dict(type='EoMTDecoder', num_classes=CLASSES, num_queries=QUERIES, num_blocks=L2,
                     num_points=64),
        lora_config=lora_cfg))
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all('lora_' in k for k in missing)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    # queries, heads and upscaler train; backbone linears are frozen, their adapters train
    assert {'decoder.q.weight', 'decoder.class_head.weight', 'decoder.mask_head.0.weight',
            'decoder.upscale.0.conv1.weight'} <= trainable
    assert 'backbone.layers.0.attn.qkv.weight' not in trainable
    assert 'backbone.layers.0.attn.qkv.lora_A' in trainable
    base.eval(), lora.eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(lora.forward_logits(img)[0], base.forward_logits(img)[0])


ALL_SCORES = ['msp', 'maxlogit', 'entropy', 'energy', 'rba', 'eam']


def test_anomaly_whole_mode_scores_logits_upsampled_to_label_size():
    """Protocol order: mask logits -> label size (unpad, unflip, resize), then the scores.

    Scoring at the network input and resizing the score maps (the wrong order) differs here by
    far more than the tolerance because the label (36 x 45) is smaller than the content.
    """
    from eomt_mm.anomaly.scores import compute_anomaly_scores

    model = build_eomt(model_type='AnomalyEoMT', test_cfg=dict(mode='whole', anomaly_scores=ALL_SCORES))
    model.eval()
    img = torch.randn(1, 3, 64, 64)
    # Content 56 x 50 (padding right 14, bottom 8), flipped, label 36 x 45.
    meta = dict(padding_size=[0, 14, 0, 8], flip=True, flip_direction='horizontal')
    with torch.no_grad():
        out = model.predict(img, [_sample(36, 45, **meta)])[0]
        (m, c), = plain_eomt(model, img)
        m = F.interpolate(m, size=(64, 64), mode='bilinear', align_corners=False)
        m = m[..., :56, :50].flip(-1)
        m = F.interpolate(m, size=(36, 45), mode='bilinear', align_corners=False)
        expected = compute_anomaly_scores(c, m, ALL_SCORES)
        # The wrong order: score maps at the input, then unpad / unflip / resize them.
        m_in = F.interpolate(plain_eomt(model, img)[0][0], size=(64, 64), mode='bilinear',
                             align_corners=False)
        wrong = compute_anomaly_scores(c, m_in, ALL_SCORES)
    assert set(out.anomaly_scores.keys()) == set(ALL_SCORES)
    worst_gap = 0.0
    for name in ALL_SCORES:
        got = out.anomaly_scores.get(name)
        assert got.shape == (1, 36, 45) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected[name], rtol=1e-4, atol=1e-5)
        resized = F.interpolate(wrong[name][:, None, :56, :50].flip(-1), size=(36, 45),
                                mode='bilinear', align_corners=False)[:, 0]
        worst_gap = max(worst_gap, float((resized - got).abs().max()))
    assert worst_gap > 1e-3, worst_gap


def test_anomaly_whole_mode_batch_with_different_label_sizes():
    model = build_eomt(model_type='AnomalyEoMT', test_cfg=dict(mode='whole', anomaly_scores=['rba']))
    model.eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model.predict(img, [_sample(64, 64), _sample(80, 96, padding_size=[0, 4, 0, 0])])
        single = model.predict(img[1:], [_sample(80, 96, padding_size=[0, 4, 0, 0])])[0]
    assert outs[0].anomaly_scores.rba.shape == (1, 64, 64)
    assert outs[1].anomaly_scores.rba.shape == (1, 80, 96)
    torch.testing.assert_close(outs[1].anomaly_scores.rba, single.anomaly_scores.rba)


def _plain_window_scores(model, window, size, names):
    from eomt_mm.anomaly.scores import compute_anomaly_scores
    (m, c), = plain_eomt(model, window)
    m = F.interpolate(m, size=size, mode='bilinear', align_corners=False)
    return compute_anomaly_scores(c, m, names)


def test_anomaly_slide_mode_windows_scored_at_label_scale():
    """Input 32 x 64, crop 64 -> resized 64 x 128, windows at 0 and 64; label 48 x 96.

    Each window's mask logits go straight to its 48 x 48 footprint at label scale.
    """
    names = ['msp', 'rba']
    model = build_eomt(model_type='AnomalyEoMT', test_cfg=dict(mode='slide', crop_size=64, anomaly_scores=names))
    model.eval()
    img = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        out = model.predict(img, [_sample(48, 96)])[0]
        big = F.interpolate(img, size=(64, 128), mode='bilinear', align_corners=False,
                            antialias=True)
        halves = [_plain_window_scores(model, big[..., s:s + 64], (48, 48), names)
                  for s in (0, 64)]
    for name in names:
        got = out.anomaly_scores.get(name)
        assert got.shape == (1, 48, 96) and got.dtype == torch.float32
        expected = torch.cat([h[name] for h in halves], -1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_anomaly_slide_mode_overlap_padding_flip():
    """Input 64 x 160 (right padding 10 -> content 64 x 150), label 32 x 75, flipped.

    Canvas = input x 0.5 = 32 x 80; windows at 0, 48, 96 -> canvas columns [0, 32), [24, 56),
    [48, 80), averaged where they overlap; padding 5 cut, flip undone.
    """
    names = ['maxlogit', 'eam']
    model = build_eomt(model_type='AnomalyEoMT', test_cfg=dict(mode='slide', crop_size=64, anomaly_scores=names))
    model.eval()
    img = torch.randn(1, 3, 64, 160)
    meta = dict(padding_size=[0, 10, 0, 0], flip=True, flip_direction='horizontal')
    with torch.no_grad():
        out = model.predict(img, [_sample(32, 75, **meta)])[0]
        parts = [_plain_window_scores(model, img[..., s:s + 64], (32, 32), names)
                 for s in (0, 48, 96)]
    count = torch.zeros(32, 80)
    for lo in (0, 24, 48):
        count[:, lo:lo + 32] += 1
    for name in names:
        total = torch.zeros(1, 32, 80)
        for lo, part in zip((0, 24, 48), parts):
            total[..., lo:lo + 32] += part[name]
        expected = (total / count)[..., :75].flip(-1)
        got = out.anomaly_scores.get(name)
        assert got.shape == (1, 32, 75)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_anomaly_scores_stay_float32_under_autocast():
    from eomt_mm.anomaly.scores import compute_anomaly_scores

    model = build_eomt(model_type='AnomalyEoMT', test_cfg=dict(mode='whole', anomaly_scores=['rba', 'maxlogit']))
    model.eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model.predict(img, [_sample(48, 40, padding_size=[0, 14, 0, 8])])[0]
        m, c = model.forward_logits(img)
    assert m.dtype == torch.bfloat16  # the network itself did run in bfloat16
    with torch.no_grad():
        up = F.interpolate(m.float(), size=(64, 64), mode='bilinear', align_corners=False)
        up = F.interpolate(up[..., :56, :50], size=(48, 40), mode='bilinear',
                           align_corners=False)
        expected = compute_anomaly_scores(c.float(), up, ['rba', 'maxlogit'])
    for name in ('rba', 'maxlogit'):
        got = out.anomaly_scores.get(name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6)


def test_strided_layer_norm_2d_equals_mmpretrain_without_the_copy():
    from mmpretrain.models.utils import LayerNorm2d

    from eomt_mm.models.decode_heads.eomt_decoder import StridedLayerNorm2d
    torch.manual_seed(0)
    ours, ref = StridedLayerNorm2d(6, eps=1e-6), LayerNorm2d(6, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    out, expected = ours(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # A channel-last view, no NCHW copy.
    assert not out.is_contiguous() and out.permute(0, 2, 3, 1).is_contiguous()
    grads = torch.autograd.grad((out * expected.detach()).sum(), [x, ours.weight])
    grads_ref = torch.autograd.grad((ref(x) * expected.detach()).sum(), [x, ref.weight])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r'\[B, C, H, W\]'):
        ours(torch.randn(2, 6, 5))
