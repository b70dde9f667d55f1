"""Outlier exposure end to end on tiny synthetic data: PasteOutliers + RbALoss raise AuPRC.

The EoMT segmentor's own loss is untouched (its owner wires RbALoss into it); this test drives
the tiny network by hand: closed-set set loss with pasted pixels ignored, plus or minus the RbA
outlier loss on the final prediction, same seed, then the pooled RbA-score AuPRC of a held-out
pasted split.
"""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.registry import MODELS, TRANSFORMS
from mmseg.structures import SegDataSample

from eomt_mm.anomaly.pixel_metrics import pooled_pixel_metrics
from eomt_mm.anomaly.outlier_loss import rba_score

K, SIZE, PASTED = 3, 32, 254


def _coco_source(tmp_path):
    img_dir = tmp_path / 'src'
    img_dir.mkdir()
    img = np.zeros((24, 24, 3), np.uint8)
    img[::2, ::2] = (0, 255, 255)  # yellow checkerboard object: unlike every inlier class
    img[1::2, 1::2] = (255, 0, 255)
    cv2.imwrite(str(img_dir / 'obj.png'), img)
    coco = dict(images=[dict(id=1, file_name='obj.png', height=24, width=24)],
                annotations=[dict(id=1, image_id=1, category_id=5, area=400.0, iscrowd=0,
                                  segmentation=[[2, 2, 21, 2, 21, 21, 2, 21]])],
                categories=[dict(id=5, name='kite')])
    (tmp_path / 'inst.json').write_text(json.dumps(coco))
    return str(tmp_path / 'inst.json'), str(img_dir)


def _scene(rng):
    """Three horizontal class bands with class colours and noise."""
    label = np.zeros((SIZE, SIZE), np.uint8)
    cuts = sorted(rng.integers(6, SIZE - 6, 2))
    label[cuts[0]:cuts[1]] = 1
    label[cuts[1]:] = 2
    colours = np.array([[200, 60, 60], [60, 160, 60], [60, 60, 200]], np.float32)
    img = colours[label] + rng.normal(0, 12, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8), label


def _batch(paste, rng, n):
    imgs, labels = [], []
    for _ in range(n):
        img, label = _scene(rng)
        out = paste(dict(img=img, gt_seg_map=label))
        imgs.append(out['img'])
        labels.append(out['gt_seg_map'])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return (x - 128.0) / 64.0, torch.from_numpy(np.stack(labels)).long()


def _model():
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='EoMT',
        backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=2, num_heads=2,
                                               feedforward_channels=64),
                      img_size=SIZE, patch_size=8, num_register_tokens=0),
        decoder=dict(type='EoMTDecoder', num_classes=K, num_queries=6, num_blocks=1,
                     num_points=64)))
    model.init_weights()
    return model


def _train(use_rba, paste, steps=40, source='probs'):
    model = _model()
    model.train()
    rba = MODELS.build(dict(type='RbALoss', score_source=source))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    for _ in range(steps):
        x, gt = _batch(paste, rng, 4)
        closed = torch.where(gt == PASTED, 255, gt)  # pasted pixels ignored by the set loss
        samples = []
        for g in closed:
            s = SegDataSample()
            s.gt_sem_seg = PixelData(data=g[None])
            samples.append(s)
        mask_logits, class_logits = model.run_network(x, masked_attn=False)
        losses = model.decoder.loss(mask_logits, class_logits, samples)
        total = sum(v for k, v in losses.items() if 'loss' in k)
        if use_rba:
            target = torch.where(gt == PASTED, 1, torch.where(gt == 255, 255, 0))
            up = F.interpolate(mask_logits[-1], size=(SIZE, SIZE), mode='bilinear',
                               align_corners=False)
            total = total + rba(class_logits[-1], up, target)
        opt.zero_grad()
        total.backward()
        opt.step()
    return model


def _auprc(model, paste, source='probs'):
    model.eval()
    x, gt = _batch(paste, np.random.default_rng(123), 16)
    with torch.no_grad():
        mask_logits, class_logits = model.forward_logits(x)
        up = F.interpolate(mask_logits, size=(SIZE, SIZE), mode='bilinear', align_corners=False)
        score = rba_score(class_logits, up, source).numpy()
    labels = gt.numpy() == PASTED
    return pooled_pixel_metrics(score[labels], score[~labels]).auprc


@pytest.mark.slow
def test_rba_outlier_exposure_raises_auprc(tmp_path):
    ann, img_dir = _coco_source(tmp_path)
    paste_cfg = dict(type='PasteOutliers', ann_file=ann, img_dir=img_dir, prob=0.5,
                     scale_range=(0.3, 0.5), paste_label=PASTED, min_area=1, seed=0)
    eval_paste = TRANSFORMS.build(dict(paste_cfg, prob=1.0, seed=99))
    base = _auprc(_train(False, TRANSFORMS.build(paste_cfg)), eval_paste)
    oe = _auprc(_train(True, TRANSFORMS.build(paste_cfg)), eval_paste)
    # Seeds 0, 1, 2 of the paste gave +0.062, +0.062, +0.046 at 40 steps.
    assert oe > base + 0.03, (base, oe)
