"""EoMT with an outlier-exposure loss (RbALoss) on pasted-outlier labels."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from eomt_mm.anomaly.outlier_loss import rba_score

EMBED, DEPTH, HEADS, L2, QUERIES, CLASSES = 32, 3, 2, 2, 6, 4
PASTED = 254
CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'


def build(outlier_loss=dict(type='RbALoss'), lora_config=None, **kw):
    model = MODELS.build(dict(
        type='AnomalyEoMT',
        backbone=dict(type='DINOv2', arch=dict(embed_dims=EMBED, num_layers=DEPTH,
                                               num_heads=HEADS, feedforward_channels=2 * EMBED),
                      img_size=32, patch_size=8, num_register_tokens=0),
        decoder=dict(type='EoMTDecoder', num_classes=CLASSES, num_queries=QUERIES,
                     num_blocks=L2, num_points=64),
        outlier_loss=outlier_loss, lora_config=lora_config, **kw))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                continue  # LoRA starts at the base model (B = 0), as after injection
            if 'gamma' in name:
                p.fill_(0.5)
            elif p.ndim >= 2 or name.endswith('bias') or 'token' in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def batch(seed=0, paste=True):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 3, 32, 32, generator=gen)
    gt = torch.randint(0, CLASSES, (2, 32, 32), generator=gen)
    gt[:, :, :3] = 255  # padding / void
    if paste:
        gt[0, 8:18, 10:22] = PASTED
        gt[1, 20:30, 4:12] = PASTED
    return img, gt


def samples(gt):
    out = []
    for g in gt:
        s = SegDataSample()
        s.set_metainfo(dict(img_shape=(32, 32), pad_shape=(32, 32)))
        s.gt_sem_seg = PixelData(data=g[None].clone())
        out.append(s)
    return out


def test_loss_key_value_and_caller_samples_untouched():
    model = build()
    model.train()
    img, gt = batch()
    data = samples(gt)
    torch.manual_seed(0)
    losses = model.loss(img, data)
    assert {'loss_cls', 'loss_mask', 'loss_dice', 'loss_rba', 'd0.loss_cls'} <= set(losses)
    assert losses['loss_rba'].ndim == 0 and torch.isfinite(losses['loss_rba'])
    # The pasted label stays in the caller's samples (only the set loss sees 255 there).
    assert all(torch.equal(s.gt_sem_seg.data[0], g) for s, g in zip(data, gt))

    # The value: RbALoss on the final prediction, mask logits upsampled to the label size,
    # target 1 on pasted pixels, 0 on labelled inliers, 255 on void.
    model.decoder.masked_attn_enabled = False
    with torch.no_grad():
        rba = model.loss(img, data)['loss_rba']
        mask_logits, class_logits = model.forward_logits(img)
        up = F.interpolate(mask_logits, size=(32, 32), mode='bilinear', align_corners=False)
        score = rba_score(class_logits, up)
        ood, ind = gt == PASTED, (gt != PASTED) & (gt != 255)
        expected = 0.5 * F.relu(score[ind]).pow(2).mean() + \
            0.5 * F.relu(5.0 - score[ood]).pow(2).mean()
    torch.testing.assert_close(rba, expected)
    assert expected > 0


def test_set_loss_ignores_pasted_pixels():
    with_oe = build()
    plain = build(outlier_loss=None)
    plain.load_state_dict(with_oe.state_dict())
    with_oe.train(), plain.train()
    img, gt = batch()
    manual = torch.where(gt == PASTED, 255, gt)
    # Same seed: same masked-attention draws and the same importance-sampled points.
    torch.manual_seed(7)
    a = with_oe.loss(img, samples(gt))
    torch.manual_seed(7)
    b = plain.loss(img, samples(manual))
    assert set(a) - set(b) == {'loss_rba'}
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # Without the outlier loss, behaviour is unchanged: a pasted label is an invalid class.
    with pytest.raises(ValueError, match='outside'):
        plain.loss(img, samples(gt))


def test_gradient_reaches_trainable_parts_only():
    lora = dict(enabled=True, rank=2, lora_alpha=4, lora_dropout=0.0,
                target_modules=['qkv', 'proj', 'fc1', 'fc2'], base_prefixes=['backbone', 'decoder'],
                trainable_modules=['decoder.mask_head'], trainable_norms=False)
    model = build(lora_config=lora)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, 'nothing trainable'
    assert all('lora_' in n or n.startswith('decoder.mask_head.') for n in trainable)
    assert 'decoder.mask_head.4.weight' in trainable
    # Adapters as after some training (with B = 0, lora_A's gradient is exactly 0).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                p.normal_(0, 0.05)
    img, gt = batch()
    torch.manual_seed(0)
    # The outlier loss alone reaches the mask MLP and the adapters.
    model.loss(img, samples(gt))['loss_rba'].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ('decoder.mask_head.0.weight', 'decoder.mask_head.4.weight',
                 'backbone.layers.2.attn.qkv.lora_A', 'backbone.layers.2.attn.qkv.lora_B'):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(g is None for n, g in grads.items() if n not in trainable)


def test_bad_outlier_labels():
    with pytest.raises(ValueError, match='collides with a class id'):
        build(outlier_label=2)
    with pytest.raises(ValueError, match='collides'):
        build(outlier_label=255)
    with pytest.raises(ValueError, match='must differ'):
        build(outlier_loss=dict(type='RbALoss', outlier_label=0))
    model = build()
    img, gt = batch()
    data = samples(gt)
    data[1].gt_sem_seg = PixelData(data=gt[1, :16][None])
    with pytest.raises(ValueError, match='one size'):
        model.loss(img, data)


def test_no_pasted_pixel_gives_finite_loss():
    model = build()
    img, gt = batch(paste=False)
    torch.manual_seed(0)
    losses = model.loss(img, samples(gt))
    assert torch.isfinite(losses['loss_rba'])


@pytest.mark.parametrize('name', [
    'eomt_lora_b640_rba_coco.py',
    'eomt/eomt-lora-r8-rba_dinov2-reg4-b_1xb16-2k_cityscapes-640x640-coco-outliers.py'])
def test_rba_config_builds(name):
    from mmengine import Config
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(str(CONFIG_DIR / name))
    init_default_scope(cfg.default_scope)
    assert cfg.model.outlier_loss.type == 'RbALoss'
    assert cfg.model.test_cfg.anomaly_scores == ['msp', 'maxlogit', 'rba']
    assert cfg.load_from and cfg.optim_wrapper.optimizer.lr == 1e-4
    pipeline = cfg.train_dataloader.dataset.pipeline
    types = [t['type'] for t in pipeline]
    paste = pipeline[types.index('PasteOutliers')]
    assert types.index('PasteOutliers') < types.index('RandomResize')
    assert paste.prob == 0.1 and paste.paste_label == cfg.model.outlier_label
    # Geometric transforms must keep the pasted label (no rescaling of label values).
    crop = pipeline[types.index('RandomCrop')]
    assert crop.get('cat_max_ratio', 1.0) == 1.0
    # Building needs no data or weights; RbA's release: only the mask MLP trains (the LoRA
    # adapters of the start model are kept, frozen).
    model = MODELS.build(cfg.model)
    assert model.outlier_loss is not None and model.outlier_label == paste.paste_label
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith('decoder.mask_head.') for n in trainable)
    assert all(n.startswith('decoder.mask_head.') for n in trainable)
    assert any('lora_A' in n for n, _ in model.named_parameters())
    assert cfg.train_cfg.max_iters == 2000 and cfg.optim_wrapper.clip_grad.max_norm == 0.01
