"""Outlier-exposure losses for mask-transformer outputs: the contract and RbA.

:class:`OutlierExposureLoss` is the contract between ``AnomalyEoMT`` and any outlier loss: the
segmentor builds the loss's target from the ground truth using the attributes the loss declares
(``outlier_label``, ``ignore_index``) and stores the value under ``loss_name``.

RbA (Nayal et al., "RbA: Segmenting Unknown Regions Rejected by All", ICCV 2023): with the
per-pixel anomaly score ``s = -sum_k tanh(S_k)`` (``S`` = the semantic map, see
:func:`eomt_mm.models.decode_heads.eomt_decoder.semantic_map`), a squared hinge pushes inlier
pixels below ``inlier_margin`` and pasted-outlier pixels above ``outlier_margin``::

    0.5 * mean_{ID} relu(s - inlier_margin)^2 + 0.5 * mean_{OOD} relu(outlier_margin - s)^2

The defaults 0 / 5 are the margins of RbA's released outlier-exposure checkpoint config
(NazirNayal8/RbA ``ckpts/swin_b_1dl_rba_ood_coco/config.yaml``: ``SCORE_NORM: tanh``,
``OUTLIER_LOSS_TARGET: nls``). Neither mmseg nor mmdet has this loss. ``score_source='logits'``
uses the per-pixel class logits ``L_k = sum_q c_q[k] * sigmoid(m_q)`` instead of ``S_k`` (then
``s`` spans ``[-K, K]``; with ``S_k`` in ``[0, 1]`` it spans ``[-K tanh(1), 0]``, so the default
margins leave only the outlier term active).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import Tensor, nn

from .scores import semantic_map

__all__ = ['OutlierExposureLoss', 'RbALoss', 'rba_score', 'rba_hinge_loss']


class OutlierExposureLoss(nn.Module):
    """Base class of the losses ``AnomalyEoMT(outlier_loss=...)`` accepts.

    A subclass computes one scalar from the final prediction and an outlier target.

    Args:
        outlier_label: Target value of pasted-outlier pixels.
        ignore_index: Target value of ignored pixels (void, or labels outside the classes).
        loss_name: Key of the loss in the segmentor's loss dict; must start with ``loss_``
            (mmengine sums those).

    Attributes:
        outlier_label (int): As above. Every other labelled pixel gets target 0 (inlier).
        ignore_index (int): As above.
        loss_name (str): As above.
    """

    outlier_label: int
    ignore_index: int
    loss_name: str

    def __init__(self, outlier_label: int = 1, ignore_index: int = 255,
                 loss_name: str = 'loss_outlier') -> None:
        super().__init__()
        if not isinstance(loss_name, str) or not loss_name.startswith('loss_'):
            raise ValueError(f"loss_name must start with 'loss_' (mmengine sums those), "
                             f'got {loss_name!r}')
        if len({0, int(outlier_label), int(ignore_index)}) != 3:
            raise ValueError(f'{type(self).__name__}: outlier_label={outlier_label} and '
                             f'ignore_index={ignore_index} must differ from each other and from '
                             '0, the inlier value of the target')
        self.outlier_label = int(outlier_label)
        self.ignore_index = int(ignore_index)
        self.loss_name = loss_name

    def forward(self, class_logits: Tensor, mask_logits: Tensor, target: Tensor) -> Tensor:
        """Loss of one prediction.

        Args:
            class_logits: ``[B, Q, K + 1]`` float32.
            mask_logits: ``[B, Q, H, W]`` float32 at the target's resolution.
            target: ``[B, H, W]``: ``outlier_label`` / 0 (inlier) / ``ignore_index``.

        Returns:
            Scalar loss.
        """
        raise NotImplementedError(f'{type(self).__name__} must implement forward')


def rba_score(class_logits: Tensor, mask_logits: Tensor, score_source: str = 'probs') -> Tensor:
    """Differentiable RbA score map ``-sum_k tanh(S_k)`` (or of the class-logit map).

    Args:
        class_logits: ``[B, Q, K+1]``.
        mask_logits: ``[B, Q, H, W]``.
        score_source: 'probs' (``S_k`` from softmax probabilities, as RbA) or 'logits'.

    Returns:
        ``[B, H, W]`` float32.
    """
    if score_source == 'probs':
        sem = semantic_map(class_logits, mask_logits)
    elif score_source == 'logits':
        sem = torch.einsum('bqk,bqhw->bkhw', class_logits.float()[..., :-1],
                           mask_logits.float().sigmoid())
    else:
        raise ValueError(f"score_source must be 'probs' or 'logits', got {score_source!r}")
    return -torch.tanh(sem).sum(dim=1)


def rba_hinge_loss(score: Tensor, target: Tensor, inlier_margin: float = 0.0,
                   outlier_margin: float = 5.0, ignore_index: int = 255,
                   outlier_label: int = 1) -> Tensor:
    """The RbA squared-hinge loss on a score map.

    Args:
        score: ``[B, H, W]`` anomaly scores (higher = more anomalous).
        target: ``[B, H, W]`` integer labels: ``outlier_label`` = pasted outlier,
            ``ignore_index`` = ignored, anything else = inlier.
        inlier_margin: inlier scores above it are penalised.
        outlier_margin: outlier scores below it are penalised.
        ignore_index: ignored label.
        outlier_label: outlier label.

    Returns:
        Scalar loss; a term whose pixel set is empty contributes 0 (keeps the graph connected).
    """
    if score.shape != target.shape:
        raise ValueError(f'score {tuple(score.shape)} and target {tuple(target.shape)} must have '
                         'the same shape (resize the target to the mask-logit resolution)')
    valid = target != ignore_index
    ood = valid & (target == outlier_label)
    ind = valid & ~ood
    zero = score.sum() * 0.0
    loss_in = F.relu(score[ind] - inlier_margin).pow(2).mean() if ind.any() else zero
    loss_out = F.relu(outlier_margin - score[ood]).pow(2).mean() if ood.any() else zero
    return 0.5 * loss_in + 0.5 * loss_out


@MODELS.register_module()
class RbALoss(OutlierExposureLoss):
    """RbA outlier loss for ``AnomalyEoMT``.

    Args:
        inlier_margin: inlier threshold (RbA's released config: 0).
        outlier_margin: outlier threshold (RbA's released config: 5).
        score_source: 'probs' (``S_k``, as RbA) or 'logits' (class-logit map).
        outlier_label: target value of pasted outlier pixels.
        ignore_index: target value of ignored pixels.
        loss_weight: multiplier of the loss.
        loss_name: key of the loss in the segmentor's loss dict (must start with ``loss_``).
    """

    def __init__(self, inlier_margin: float = 0.0, outlier_margin: float = 5.0,
                 score_source: str = 'probs', outlier_label: int = 1, ignore_index: int = 255,
                 loss_weight: float = 1.0, loss_name: str = 'loss_rba') -> None:
        super().__init__(outlier_label=outlier_label, ignore_index=ignore_index,
                         loss_name=loss_name)
        if score_source not in ('probs', 'logits'):
            raise ValueError(f"score_source must be 'probs' or 'logits', got {score_source!r}")
        self.inlier_margin = inlier_margin
        self.outlier_margin = outlier_margin
        self.score_source = score_source
        self.loss_weight = loss_weight

    def forward(self, class_logits: Tensor, mask_logits: Tensor, target: Tensor) -> Tensor:
        """Weighted RbA loss of one prediction (see :meth:`OutlierExposureLoss.forward`)."""
        score = rba_score(class_logits, mask_logits, self.score_source)
        return self.loss_weight * rba_hinge_loss(score, target, self.inlier_margin,
                                                 self.outlier_margin, self.ignore_index,
                                                 self.outlier_label)
