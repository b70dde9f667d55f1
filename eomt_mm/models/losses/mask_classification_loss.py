"""Mask2Former set loss for one EoMT prediction, assembled from mmseg / mmcv parts.

Per prediction (reference: tue-mps/eomt ``training/mask_classification_loss.py``, itself the
Mask2Former loss):

1. Hungarian matching of queries to target masks with ``class_weight * (-softmax prob)`` +
   ``mask_weight * sigmoid BCE`` + ``dice_weight * dice`` (smoothing 1), the mask costs computed
   on ``num_points`` uniformly sampled points (mmseg ``MatchMasks`` + ``HungarianAssigner`` +
   ``ClassificationCost`` / ``CrossEntropyLossCost`` / ``DiceCost``).
2. Class loss: cross entropy over all queries (unmatched = "no object", weight
   ``no_object_weight``), weighted mean, times ``class_weight``.
3. Mask losses on ``num_points`` points per matched mask chosen by uncertainty
   (``get_uncertain_point_coords_with_randomness``, mmcv ``point_sample``): sigmoid BCE (mean
   over points) and dice, each summed over masks, divided by the number of target masks averaged
   over ranks (at least 1), times ``mask_weight`` / ``dice_weight``.
"""
from typing import Dict, List

import torch
import torch.nn as nn
from mmcv.ops import point_sample
from mmengine.dist import all_reduce, get_world_size
from mmengine.structures import InstanceData
from mmseg.models.losses import CrossEntropyLoss, DiceLoss
from mmseg.models.utils import get_uncertain_point_coords_with_randomness
from mmseg.utils import MatchMasks, SampleList, seg_data_to_instance_data
from torch import Tensor


class MaskClassificationLoss(nn.Module):
    """Set loss of one (mask_logits, class_logits) prediction.

    Args:
        num_classes: Number of real classes K.
        num_queries: Number of queries Q.
        num_points: Points per mask for matching and for the mask losses.
        oversample_ratio: Candidate oversampling for importance sampling (>= 1).
        importance_sample_ratio: Share of points chosen by uncertainty, in [0, 1].
        class_weight: Weight of the class cost and loss.
        mask_weight: Weight of the BCE mask cost and loss.
        dice_weight: Weight of the dice cost and loss.
        no_object_weight: Cross-entropy weight of the "no object" class.
        ignore_index: Label value that becomes no target mask.
    """

    def __init__(self,
                 num_classes: int,
                 num_queries: int,
                 num_points: int = 12544,
                 oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75,
                 class_weight: float = 2.0,
                 mask_weight: float = 5.0,
                 dice_weight: float = 5.0,
                 no_object_weight: float = 0.1,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f'num_points must be a positive int, got {num_points!r}')
        if oversample_ratio < 1:
            raise ValueError(f'oversample_ratio must be >= 1, got {oversample_ratio}')
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f'importance_sample_ratio must be in [0, 1], got '
                             f'{importance_sample_ratio}')
        self.num_classes = num_classes
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.ignore_index = ignore_index
        self.matcher = MatchMasks(
            num_points=num_points,
            num_queries=num_queries,
            num_classes=num_classes,
            assigner=dict(
                type='HungarianAssigner',
                match_costs=[
                    dict(type='ClassificationCost', weight=class_weight),
                    dict(type='CrossEntropyLossCost', weight=mask_weight, use_sigmoid=True),
                    # eps=1 is the reference's +1 smoothing of numerator and denominator.
                    dict(type='DiceCost', weight=dice_weight, pred_act=True, eps=1.0,
                         naive_dice=True),
                ]))
        class_weights = [1.0] * num_classes + [no_object_weight]
        self.loss_cls = CrossEntropyLoss(
            use_sigmoid=False, loss_weight=class_weight, class_weight=class_weights,
            reduction='mean', avg_non_ignore=True)
        self.loss_mask = CrossEntropyLoss(
            use_sigmoid=True, loss_weight=mask_weight, reduction='mean', avg_non_ignore=True)
        # ignore_index=None: mmseg's dice drops channel `ignore_index` of its input, which here
        # would be a sampled point, not a class.
        self.loss_dice = DiceLoss(
            use_sigmoid=True, activate=True, naive_dice=True, eps=1.0, loss_weight=dice_weight,
            reduction='mean', ignore_index=None)
        self.register_buffer('class_weights', torch.tensor(class_weights), persistent=False)

    def targets_from_samples(self, batch_data_samples: SampleList) -> List[InstanceData]:
        """One binary target mask per class present in each ``gt_sem_seg`` (ignore removed)."""
        for sample in batch_data_samples:
            if 'gt_sem_seg' not in sample:
                raise KeyError('EoMT loss needs data_samples with gt_sem_seg')
        instances = seg_data_to_instance_data(self.ignore_index, batch_data_samples)
        for inst in instances:
            if len(inst.labels) and (int(inst.labels.min()) < 0
                                     or int(inst.labels.max()) >= self.num_classes):
                raise ValueError(
                    f'gt_sem_seg has labels {inst.labels.tolist()} outside [0, '
                    f'{self.num_classes}) that are not ignore_index={self.ignore_index}')
        return instances

    def forward(self, mask_logits: Tensor, class_logits: Tensor,
                gt_instances: List[InstanceData]) -> Dict[str, Tensor]:
        """Loss of one prediction.

        Args:
            mask_logits: ``[B, Q, h, w]``.
            class_logits: ``[B, Q, K + 1]``.
            gt_instances: Per image ``labels [G]`` and ``masks [G, H, W]`` (any resolution: both
                are sampled at normalised point coordinates).

        Returns:
            ``{'loss_cls', 'loss_mask', 'loss_dice'}``, weights applied.
        """
        batch, num_queries = class_logits.shape[:2]
        with torch.no_grad():
            labels, mask_targets, mask_weights, _ = self.matcher.get_targets(
                class_logits.detach().float(), mask_logits.detach().float(), gt_instances)

        # Class loss: the weighted mean over all queries, as torch's weighted cross entropy.
        flat_labels = labels.flatten()
        class_weights = self.class_weights.to(class_logits.device)
        loss_cls = self.loss_cls(
            class_logits.flatten(0, 1).float(), flat_labels,
            avg_factor=class_weights[flat_labels].sum(),
            ignore_index=-100)

        # Normaliser: number of target masks averaged over ranks, at least 1.
        num_masks = mask_weights.sum().float()
        if get_world_size() > 1:
            all_reduce(num_masks, op='mean')
        num_masks = num_masks.clamp(min=1)

        # MatchMasks returns the matched targets ordered by query index (the assigner's rows are
        # queries, returned sorted), the same order as this boolean selection.
        matched = mask_logits[mask_weights > 0]
        if matched.shape[0] == 0:
            zero = mask_logits.sum() * 0
            return {'loss_cls': loss_cls, 'loss_mask': zero, 'loss_dice': zero}
        matched = matched[:, None].float()
        targets = mask_targets[:, None].float()
        with torch.no_grad():
            zeros = torch.zeros(matched.shape[0], dtype=torch.long, device=matched.device)
            coords = get_uncertain_point_coords_with_randomness(
                matched, zeros, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio)
            point_targets = point_sample(targets, coords, align_corners=False).squeeze(1)
        point_logits = point_sample(matched, coords, align_corners=False).squeeze(1)

        # BCE: mean over the points of a mask, summed over masks, / num_masks.
        # [N, P] logits and [N, P] soft targets: mmseg's BCE path for same-shape labels (no
        # one-hot expansion; every point valid since targets lie in [0, 1]).
        loss_mask = self.loss_mask(
            point_logits, point_targets, avg_factor=num_masks * self.num_points,
            ignore_index=-100)
        loss_dice = self.loss_dice(point_logits, point_targets, avg_factor=num_masks)
        return {'loss_cls': loss_cls, 'loss_mask': loss_mask, 'loss_dice': loss_dice}
