"""EoMT set loss: matching costs, loss values against the plain formulas, over-fitting."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import InstanceData, PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from eomt_mm.models.losses.mask_classification_loss import MaskClassificationLoss

K, Q = 4, 6


def plain_point_sample(x, coords):
    """x [N, 1, H, W] at coords [N, P, 2] in [0, 1] -> [N, P]."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


def plain_costs(cls_logits, point_logits, point_targets, labels, w=(2.0, 5.0, 5.0)):
    """[Q, G] cost: w0 * -softmax[label] + w1 * mean BCE + w2 * dice (smoothing 1)."""
    c_cls = -cls_logits.softmax(-1)[:, labels]
    bce = torch.stack([
        F.binary_cross_entropy_with_logits(point_logits, t.expand_as(point_logits),
                                           reduction='none').mean(-1) for t in point_targets
    ], 1)
    p = point_logits.sigmoid()
    dice = 1 - (2 * p @ point_targets.T + 1) / (
        p.sum(-1)[:, None] + point_targets.sum(-1)[None] + 1)
    return w[0] * c_cls + w[1] * bce + w[2] * dice


def brute_force(cost):
    q, g = cost.shape
    best = min(itertools.permutations(range(q), g),
               key=lambda perm: sum(cost[perm[j], j].item() for j in range(g)))
    return list(best)


def random_instance(g, h=32, w=32):
    labels = torch.randperm(K)[:g]
    owner = torch.randint(0, g, (h // 8, w // 8)).repeat_interleave(8, 0).repeat_interleave(8, 1)
    masks = torch.stack([(owner == j).long() for j in range(g)])
    return InstanceData(labels=labels, masks=masks)


def test_matching_uses_specified_costs():
    loss = MaskClassificationLoss(num_classes=K, num_queries=Q, num_points=50)
    differs_from_unweighted = 0
    for seed in range(12):
        torch.manual_seed(seed)
        inst = random_instance(3)
        cls_logits = torch.randn(1, Q, K + 1) * 2
        mask_logits = torch.randn(1, Q, 8, 8) * 2
        torch.manual_seed(100 + seed)
        labels, mask_targets, mask_weights, avg = loss.matcher.get_targets(
            cls_logits, mask_logits, [inst])
        torch.manual_seed(100 + seed)
        coords = torch.rand(1, 50, 2)
        pl = plain_point_sample(mask_logits[0][:, None], coords.expand(Q, -1, -1))
        pt = plain_point_sample(inst.masks[:, None].float(), coords.expand(3, -1, -1))
        perm = brute_force(plain_costs(cls_logits[0], pl, pt, inst.labels))
        expected = torch.full((Q, ), K)
        expected[perm] = inst.labels
        assert torch.equal(labels[0], expected), seed
        assert avg == 3 and mask_weights.sum() == 3
        # targets come in query order
        order = sorted(range(3), key=lambda j: perm[j])
        assert torch.equal(mask_targets, inst.masks[order])
        unweighted = brute_force(plain_costs(cls_logits[0], pl, pt, inst.labels, (1, 1, 1)))
        differs_from_unweighted += unweighted != perm
    # The weights matter on these inputs, so the check above is sensitive to them.
    assert differs_from_unweighted > 0


def test_loss_values_match_plain_formulas():
    num_points = 40
    # importance 1 and oversample 1: the loss points are a permutation of one uniform draw,
    # and both mask losses are permutation invariant.
    loss = MaskClassificationLoss(num_classes=K, num_queries=Q, num_points=num_points,
                                  oversample_ratio=1.0, importance_sample_ratio=1.0)
    torch.manual_seed(0)
    insts = [random_instance(2), random_instance(3)]
    cls_logits = torch.randn(2, Q, K + 1, requires_grad=True)
    mask_logits = torch.randn(2, Q, 8, 8, requires_grad=True)
    torch.manual_seed(7)
    out = loss(mask_logits, cls_logits, insts)

    torch.manual_seed(7)
    match_coords = [torch.rand(1, num_points, 2) for _ in insts]
    loss_coords = torch.rand(5, num_points, 2)
    target_classes = torch.full((2, Q), K)
    matched_preds, matched_targets = [], []
    with torch.no_grad():
        for b, (inst, c) in enumerate(zip(insts, match_coords)):
            g = len(inst.labels)
            pl = plain_point_sample(mask_logits[b][:, None], c.expand(Q, -1, -1))
            pt = plain_point_sample(inst.masks[:, None].float(), c.expand(g, -1, -1))
            perm = brute_force(plain_costs(cls_logits[b], pl, pt, inst.labels))
            target_classes[b, perm] = inst.labels
            for q in sorted(perm):
                matched_preds.append(mask_logits[b, q])
                matched_targets.append(inst.masks[perm.index(q)].float())
    weight = torch.tensor([1.0] * K + [0.1])
    exp_cls = 2.0 * F.cross_entropy(cls_logits.transpose(1, 2), target_classes, weight=weight)
    p = plain_point_sample(torch.stack(matched_preds)[:, None], loss_coords)
    t = plain_point_sample(torch.stack(matched_targets)[:, None], loss_coords)
    exp_mask = 5.0 * F.binary_cross_entropy_with_logits(p, t, reduction='none').mean(-1).sum() / 5
    s = p.sigmoid()
    exp_dice = 5.0 * (1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)).sum() / 5
    torch.testing.assert_close(out['loss_cls'], exp_cls)
    torch.testing.assert_close(out['loss_mask'], exp_mask)
    torch.testing.assert_close(out['loss_dice'], exp_dice)
    sum(out.values()).backward()
    assert cls_logits.grad.abs().sum() > 0 and mask_logits.grad.abs().sum() > 0


def test_image_without_targets_gives_finite_zero_mask_loss():
    loss = MaskClassificationLoss(num_classes=K, num_queries=Q, num_points=16)
    sample = SegDataSample()
    sample.gt_sem_seg = PixelData(data=torch.full((1, 32, 32), 255))
    insts = loss.targets_from_samples([sample])
    mask_logits = torch.randn(1, Q, 8, 8, requires_grad=True)
    cls_logits = torch.randn(1, Q, K + 1, requires_grad=True)
    out = loss(mask_logits, cls_logits, insts)
    assert out['loss_mask'] == 0 and out['loss_dice'] == 0
    # every query is "no object"
    torch.testing.assert_close(
        out['loss_cls'], 2.0 * F.cross_entropy(cls_logits[0], torch.full((Q, ), K)))
    sum(out.values()).backward()
    assert cls_logits.grad.abs().sum() > 0


def test_labels_out_of_range_are_rejected():
    loss = MaskClassificationLoss(num_classes=K, num_queries=Q, num_points=16)
    sample = SegDataSample()
    sample.gt_sem_seg = PixelData(data=torch.full((1, 8, 8), K))
    with pytest.raises(ValueError, match='outside'):
        loss.targets_from_samples([sample])


def _batch(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, size, size, generator=g)
    samples = []
    for i in range(n):
        cells = torch.randint(0, K, (size // 8, size // 8), generator=g)
        label = cells.repeat_interleave(8, 0).repeat_interleave(8, 1)
        label[:2] = 255
        # make the classes visible in the image so the task is learnable
        imgs[i] += label.clamp(max=K).float()[None] * torch.tensor([1.0, -1.0, 0.5])[:, None, None]
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=label[None])
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size)))
        samples.append(s)
    return imgs, samples


def test_loss_decreases_when_overfitting():
    model = MODELS.build(dict(
        type='EoMT',
        backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=4, num_heads=2,
                                               feedforward_channels=64),
                      img_size=32, patch_size=8, num_register_tokens=4),
        decoder=dict(type='EoMTDecoder', num_classes=K, num_queries=8, num_blocks=2,
                     num_points=64)))
    model.init_weights()
    model.train()
    imgs, samples = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    history = []
    for step in range(20):
        losses = model(imgs, samples, mode='loss')
        if step == 0:
            # deep supervision: L2 = 2 intermediate predictions + the final one
            assert sorted(losses) == sorted(
                [f'{p}loss_{k}' for p in ('', 'd0.', 'd1.') for k in ('cls', 'mask', 'dice')])
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        if step == 0:
            for name in ('decoder.q.weight', 'decoder.upscale.0.conv1.weight',
                         'decoder.class_head.weight', 'backbone.layers.0.attn.qkv.weight',
                         'backbone.cls_token'):
                assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
        opt.step()
        history.append(total.item())
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.5 * first, history
