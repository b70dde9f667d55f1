"""Anomaly scores of an ensemble of K EoMT members.

For member ``k`` with query class probabilities ``p^k_q`` and mask sigmoids ``sigma(m^k_q)``, its
per-pixel class scores are ``S^k_c = sum_q p^k_q[c] sigma(m^k_q)`` (the semantic map of
:mod:`eomt_mm.anomaly.scores`).

Mean-score ensemble (the six single-model names, :data:`eomt_mm.anomaly.scores.SCORE_NAMES`):
each existing score is computed on the mean over members of the per-pixel maps it is made of,
``S = (1/K) sum_k S^k`` (msp, entropy, energy, rba), ``L = (1/K) sum_k L^k`` (maxlogit) and the
EAM mass ``(1/K) sum_k sum_q sigma(m^k_q) max_c p^k_q[c]``. It is evaluated as one set of ``K * Q``
queries whose class entries are weighted ``1/K``, so the formulas are those of
:mod:`eomt_mm.anomaly.scores` itself (averaging member predictions: Lakshminarayanan et al.,
"Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS 2017).

Disagreement scores (:data:`DISAGREEMENT_SCORE_NAMES`):

============  ==================================================================================
name          score
============  ==================================================================================
mutual_info   ``H(mean_k P^k) - mean_k H(P^k)`` with ``P^k = S^k / sum_c S^k_c`` (each member's
              normalised class distribution, as the ``entropy`` score) and ``H`` the Shannon
              entropy in nats: the mutual information between the prediction and the member
              (BALD: Houlsby et al., "Bayesian Active Learning for Classification and Preference
              Learning", 2011; the epistemic term of Depeweg et al., "Decomposition of
              Uncertainty in Bayesian Deep Learning", ICML 2018). Zero when all members agree.
rba_variance  ``(1/K) sum_k (R^k - mean_j R^j)^2`` with ``R^k = -sum_c tanh(S^k_c)`` each
              member's RbA score (Nayal et al., ICCV 2023): the population variance over members
              (ensemble variance as uncertainty: Lakshminarayanan et al., NeurIPS 2017).
============  ==================================================================================

Higher = more anomalous for every name; everything is computed in float32, pixel chunk by
pixel chunk.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Union

import torch
from torch import Tensor

from ..scores import (DISAGREEMENT_SCORE_NAMES, SCORE_NAMES, check_names_among,
                      check_score_names, scores_on_chunk)

__all__ = ['DISAGREEMENT_SCORE_NAMES', 'ENSEMBLE_SCORE_NAMES', 'check_ensemble_score_names',
           'ensemble_anomaly_scores', 'member_score_name']

#: Scores only an ensemble has: disagreement between its members.
#: Every name an ensemble computes: the mean-score versions of the single-model scores, then the
#: disagreement scores.
ENSEMBLE_SCORE_NAMES = tuple(SCORE_NAMES) + DISAGREEMENT_SCORE_NAMES

_DEFAULT_CHUNK_PIXELS = 1 << 20


def member_score_name(name: str, member: int) -> str:
    """Field name of member ``member``'s own (single-model) score ``name``: ``'msp_m0'``."""
    return f'{name}_m{member}'


def check_ensemble_score_names(names: Union[str, Iterable[str]]) -> List[str]:
    """Validated, lower-cased, de-duplicated ensemble score names (order kept).

    Args:
        names: Names among :data:`ENSEMBLE_SCORE_NAMES`.

    Returns:
        The names.
    """
    return check_names_among(names, ENSEMBLE_SCORE_NAMES, 'ensemble anomaly score')


def _entropy(dist: Tensor) -> Tensor:
    """Shannon entropy (nats) over dim 1; ``0 log 0 = 0``."""
    return -torch.special.xlogy(dist, dist).sum(dim=1)


def _normalised(sem: Tensor) -> Tensor:
    """``S / sum_c S`` over dim 1, as the single-model ``entropy`` score normalises."""
    return sem / sem.sum(dim=1, keepdim=True).clamp_min(torch.finfo(sem.dtype).tiny)


def ensemble_anomaly_scores(class_logits: Tensor, mask_logits: Tensor,
                            names: Union[str, Iterable[str]],
                            member_names: Sequence[str] = (),
                            chunk_pixels: int = _DEFAULT_CHUNK_PIXELS) -> Dict[str, Tensor]:
    """Ensemble scores (and optionally each member's own scores) in one pass over the pixels.

    Args:
        class_logits: ``[K, B, Q, C + 1]`` per-member query class logits (last = no object).
        mask_logits: ``[K, B, Q, H, W]`` per-member mask logits at the scoring resolution.
        names: Names among :data:`ENSEMBLE_SCORE_NAMES` (see the module docstring).
        member_names: Single-model score names also returned per member, as
            :func:`member_score_name` fields.
        chunk_pixels: Pixels processed at a time (memory bound, not a result knob).

    Returns:
        name -> ``[B, H, W]`` float32 (higher = more anomalous).
    """
    names = check_ensemble_score_names(names)
    member_names = check_score_names(member_names) if member_names else []
    if class_logits.dim() != 4 or mask_logits.dim() != 5 \
            or class_logits.shape[:3] != mask_logits.shape[:3]:
        raise ValueError('ensemble scores need class_logits [K, B, Q, C+1] and mask_logits '
                         f'[K, B, Q, H, W], got {tuple(class_logits.shape)} and '
                         f'{tuple(mask_logits.shape)}')
    if chunk_pixels < 1:
        raise ValueError(f'chunk_pixels must be >= 1, got {chunk_pixels}')
    num_members, batch, queries, height, width = mask_logits.shape
    logits_all = class_logits.float()
    probs = logits_all.softmax(-1)[..., :-1]  # [K, B, Q, C]
    logits = logits_all[..., :-1]
    best = probs.amax(dim=-1)  # [K, B, Q]
    mean_names = [n for n in names if n in SCORE_NAMES]
    # The K members as one query set of K * Q queries weighted 1/K (see the module docstring).
    weight = 1.0 / num_members
    probs_cat = probs.transpose(0, 1).reshape(batch, num_members * queries, -1) * weight
    logits_cat = logits.transpose(0, 1).reshape(batch, num_members * queries, -1) * weight
    best_cat = best.transpose(0, 1).reshape(batch, num_members * queries) * weight
    flat = mask_logits.reshape(num_members, batch, queries, height * width)
    fields = names + [member_score_name(n, k) for k in range(num_members) for n in member_names]
    outs = {name: torch.empty(batch, height * width, dtype=torch.float32,
                              device=mask_logits.device) for name in fields}
    for start in range(0, height * width, chunk_pixels):
        stop = min(start + chunk_pixels, height * width)
        sig = flat[..., start:stop].float().sigmoid()  # [K, B, Q, P]
        if mean_names:
            sig_cat = sig.transpose(0, 1).reshape(batch, num_members * queries, stop - start)
            for name, value in scores_on_chunk(mean_names, probs_cat, logits_cat, best_cat,
                                               sig_cat).items():
                outs[name][:, start:stop] = value
        for k in range(num_members):
            for name, value in scores_on_chunk(member_names, probs[k], logits[k], best[k],
                                               sig[k]).items():
                outs[member_score_name(name, k)][:, start:stop] = value
        if 'mutual_info' in names or 'rba_variance' in names:
            sem = torch.einsum('kbqc,kbqp->kbcp', probs, sig)  # members' S^k
            if 'mutual_info' in names:
                dist = _normalised(sem.flatten(0, 1)).view_as(sem)
                outs['mutual_info'][:, start:stop] = (
                    _entropy(dist.mean(dim=0)) - _entropy(dist.flatten(0, 1)).view(
                        num_members, batch, -1).mean(dim=0))
            if 'rba_variance' in names:
                rba = -torch.tanh(sem).sum(dim=2)  # [K, B, P]
                outs['rba_variance'][:, start:stop] = rba.var(dim=0, unbiased=False)
            del sem
    return {name: value.view(batch, height, width) for name, value in outs.items()}
