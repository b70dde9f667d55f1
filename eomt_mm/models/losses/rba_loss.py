"""RbA outlier-exposure loss (Nayal et al., "RbA: Segmenting Unknown Regions Rejected by All",
ICCV 2023) for mask-transformer outputs.

With the per-pixel anomaly score ``s = -sum_k tanh(S_k)`` (``S`` = semantic map from the class and
mask logits, see :func:`eomt_mm.anomaly.scores.semantic_map`), the loss is a squared hinge that
pushes inlier pixels below ``inlier_margin`` and pasted-outlier pixels above ``outlier_margin``::

    0.5 * mean_{ID} relu(s - inlier_margin)^2 + 0.5 * mean_{OOD} relu(outlier_margin - s)^2

Neither mmseg nor mmdet has this loss. ``score_source='logits'`` uses the per-pixel class logits
``L_k = sum_q c_q[k] * sigmoid(m_q)`` instead of ``S_k`` (then ``s`` spans ``[-K, K]``; with ``S_k``
in ``[0, 1]`` it spans ``[-K tanh(1), 0]``, so the default margins 0 / 5 only leave the outlier
term active).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import Tensor, nn

from eomt_mm.anomaly.scores import semantic_map


def rba_score(class_logits: Tensor, mask_logits: Tensor, score_source: str = 'probs') -> Tensor:
    """Differentiable RbA score map ``-sum_k tanh(S_k)`` (or of the class-logit map).

    Args:
        class_logits: ``[B, Q, K+1]``.
        mask_logits: ``[B, Q, H, W]``.
        score_source: 'probs' (``S_k`` from softmax probabilities, anomaly.md) or 'logits'.

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
class RbALoss(nn.Module):
    """RbA outlier loss module for the EoMT segmentor.

    Args:
        inlier_margin: inlier threshold (paper: 0).
        outlier_margin: outlier threshold (paper: 5).
        score_source: 'probs' (``S_k``, anomaly.md) or 'logits' (class-logit map).
        outlier_label: target value of pasted outlier pixels.
        ignore_index: target value of ignored pixels.
        loss_weight: multiplier of the loss.
        loss_name: key of the loss in the segmentor's loss dict (must start with ``loss_``).
    """

    def __init__(self, inlier_margin: float = 0.0, outlier_margin: float = 5.0,
                 score_source: str = 'probs', outlier_label: int = 1, ignore_index: int = 255,
                 loss_weight: float = 1.0, loss_name: str = 'loss_rba') -> None:
        super().__init__()
        if score_source not in ('probs', 'logits'):
            raise ValueError(f"score_source must be 'probs' or 'logits', got {score_source!r}")
        if not loss_name.startswith('loss_'):
            raise ValueError(f"loss_name must start with 'loss_' (mmengine sums those), "
                             f'got {loss_name!r}')
        self.inlier_margin = inlier_margin
        self.outlier_margin = outlier_margin
        self.score_source = score_source
        self.outlier_label = outlier_label
        self.ignore_index = ignore_index
        self.loss_weight = loss_weight
        self._loss_name = loss_name

    @property
    def loss_name(self) -> str:
        """Key of this loss in the loss dict."""
        return self._loss_name

    def forward(self, class_logits: Tensor, mask_logits: Tensor, target: Tensor) -> Tensor:
        """Loss of one set of predictions.

        Args:
            class_logits: ``[B, Q, K+1]``.
            mask_logits: ``[B, Q, H, W]`` (at the target's resolution).
            target: ``[B, H, W]`` outlier labels (``outlier_label`` / ``ignore_index`` / other).

        Returns:
            Weighted scalar loss.
        """
        score = rba_score(class_logits, mask_logits, self.score_source)
        return self.loss_weight * rba_hinge_loss(score, target, self.inlier_margin,
                                                 self.outlier_margin, self.ignore_index,
                                                 self.outlier_label)
