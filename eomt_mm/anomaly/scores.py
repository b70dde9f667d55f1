"""Per-pixel anomaly scores from mask-transformer (EoMT) outputs.

With per-query class probabilities ``p_q = softmax(c_q)`` over ``K + 1`` entries (the last one is
"no object") and mask logits ``m_q``, the semantic inference map is
``S_k(x) = sum_q p_q[k] * sigmoid(m_q(x))`` for the ``K`` real classes (EoMT's and
Mask2Former's semantic inference, defined once in
:func:`eomt_mm.models.decode_heads.eomt_decoder.semantic_map`).
Higher score = more anomalous for every name:

=========  ==========================================================================
name       score
=========  ==========================================================================
msp        ``1 - max_k S_k``
maxlogit   ``-max_k L_k`` with ``L_k = sum_q c_q[k] * sigmoid(m_q)``
entropy    Shannon entropy (nats) of ``S`` normalised to sum 1 over ``k``
energy     ``-logsumexp_k S_k``
rba        ``-sum_k tanh(S_k)`` (Nayal et al., ICCV 2023)
eam        ``1 - sum_q sigmoid(m_q) * max_{k<=K} p_q[k]``
=========  ==========================================================================

Sources: MSP (Hendrycks & Gimpel, ICLR 2017), MaxLogit (Hendrycks et al., ICML 2022), entropy,
energy (Liu et al., NeurIPS 2020), RbA (Nayal et al., "RbA: Segmenting Unknown Regions Rejected
by All", ICCV 2023), EAM (Grcic et al., "On Advantages of Mask-level Recognition for Outlier-aware
Segmentation", CVPR 2023 workshops). ``1 - sum_k S_k`` is a "no-class" score, not RbA.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Union

import torch
from torch import Tensor

from eomt_mm.models.decode_heads.eomt_decoder import semantic_map as _semantic_map

#: Names accepted by :func:`compute_anomaly_scores`, in documentation order.
SCORE_NAMES = ('msp', 'maxlogit', 'entropy', 'energy', 'rba', 'eam')

# Scores that need the semantic map S (B, K, pixels).
_NEEDS_S = frozenset({'msp', 'entropy', 'energy', 'rba'})

# Pixels per chunk: bounds the (K, pixels) float32 intermediates (S and L) to K * 4 MiB each,
# so a 2048x1024 label map with K=19 never holds the full 160 MB semantic map twice.
_DEFAULT_CHUNK_PIXELS = 1 << 20


def check_score_names(names: Union[str, Iterable[str]]) -> List[str]:
    """Validates score names and returns them as a de-duplicated list (order kept).

    Args:
        names: one score name or an iterable of names (case-insensitive).

    Returns:
        The lower-cased names, without duplicates.

    Raises:
        ValueError: a name is not one of :data:`SCORE_NAMES`, or no name is given.
    """
    return check_names_among(names, SCORE_NAMES, 'anomaly score')


def check_names_among(names: Union[str, Iterable[str]], valid: Sequence[str],
                      kind: str) -> List[str]:
    """Lower-cased, de-duplicated ``names`` (order kept), each one of ``valid``.

    The one validation behind :func:`check_score_names` and the ensemble's score names.

    Args:
        names: One name or an iterable of names (case-insensitive).
        valid: The accepted names.
        kind: What a name is, for the messages (``'anomaly score'``).

    Returns:
        The names.

    Raises:
        ValueError: A name is not a string or not one of ``valid``, or no name is given.
    """
    if isinstance(names, str):
        names = [names]
    out: List[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f'{kind} names must be strings, got {name!r} '
                             f'({type(name).__name__}); valid names: {", ".join(valid)}')
        key = name.lower()
        if key not in valid:
            raise ValueError(f'unknown {kind} {name!r}; valid names: {", ".join(valid)}')
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError(f'no {kind} name given; valid names: {", ".join(valid)}')
    return out


#: Scores only an ensemble of adapters produces (``AdapterEnsembleEoMT``): the members'
#: disagreement (see :mod:`eomt_mm.anomaly.ensemble.scores` for the formulas and sources).
DISAGREEMENT_SCORE_NAMES = ('mutual_info', 'rba_variance')

_MEMBER_FIELD = re.compile(r'^(?P<score>[a-z]+)_m(?P<member>\d+)$')


def check_evaluated_score_names(names: Union[str, Iterable[str]]) -> List[str]:
    """Validates the names an evaluation may read from ``anomaly_scores``.

    Besides :data:`SCORE_NAMES` (single models, and the mean-score ensemble) an ensemble's
    predictions hold :data:`DISAGREEMENT_SCORE_NAMES` and per-member fields
    ``<score>_m<k>`` (e.g. ``msp_m0``).

    Args:
        names: one name or an iterable of names (case-insensitive).

    Returns:
        The lower-cased names, without duplicates, order kept.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), or no name.
    """
    if isinstance(names, str):
        names = [names]
    out: List[str] = []
    for name in names:
        key = name.lower() if isinstance(name, str) else name
        member = _MEMBER_FIELD.match(key) if isinstance(key, str) else None
        if key not in DISAGREEMENT_SCORE_NAMES and not (member and
                                                        member.group('score') in SCORE_NAMES):
            check_score_names([name])  # raises for anything else, listing the valid names
        if key not in out:
            out.append(key)
    if not out:
        check_score_names([])  # raises: no name given
    return out


def semantic_map(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """The semantic inference map ``S_k = sum_q softmax(c_q)[k] * sigmoid(m_q)``.

    Differentiable (used by the RbA outlier loss); computed in float32.

    Args:
        class_logits: ``[B, Q, K+1]`` per-query class logits (last entry = no object).
        mask_logits: ``[B, Q, H, W]`` per-query mask logits.

    Returns:
        ``[B, K, H, W]`` float32 tensor.
    """
    _check_shapes(class_logits, mask_logits)
    return _semantic_map(class_logits.float(), mask_logits.float())


def _check_shapes(class_logits: Tensor, mask_logits: Tensor) -> None:
    if not isinstance(class_logits, Tensor) or class_logits.dim() != 3:
        raise ValueError('class_logits must be a tensor [B, Q, K+1], got '
                         f'{getattr(class_logits, "shape", type(class_logits).__name__)}')
    if not isinstance(mask_logits, Tensor) or mask_logits.dim() != 4:
        raise ValueError('mask_logits must be a tensor [B, Q, H, W], got '
                         f'{getattr(mask_logits, "shape", type(mask_logits).__name__)}')
    if class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(f'class_logits {tuple(class_logits.shape)} and mask_logits '
                         f'{tuple(mask_logits.shape)} disagree on batch size / number of queries')
    if class_logits.shape[-1] < 2:
        raise ValueError('class_logits needs at least one class plus the no-object entry, '
                         f'got last dimension {class_logits.shape[-1]}')


def scores_on_chunk(names: Sequence[str], probs: Tensor, logits: Tensor, best_prob: Tensor,
                     sig: Tensor) -> Dict[str, Tensor]:
    """Scores for one chunk of pixels (the per-pixel formulas; :func:`compute_anomaly_scores`
    loops it over chunks, the ONNX export and the ensemble scores call it on their own pixels).

    Args:
        names: validated score names.
        probs: ``[B, Q, K]`` class probabilities without the no-object entry.
        logits: ``[B, Q, K]`` class logits without the no-object entry.
        best_prob: ``[B, Q]`` ``max_k probs``.
        sig: ``[B, Q, P]`` sigmoid of the mask logits of ``P`` pixels.

    Returns:
        name -> ``[B, P]`` float32.
    """
    out: Dict[str, Tensor] = {}
    if _NEEDS_S.intersection(names):
        sem = torch.einsum('bqk,bqp->bkp', probs, sig)
        for name in names:
            if name == 'msp':
                out[name] = 1.0 - sem.amax(dim=1)
            elif name == 'entropy':
                total = sem.sum(dim=1, keepdim=True).clamp_min(torch.finfo(sem.dtype).tiny)
                dist = sem / total
                # xlogy gives 0 * log 0 = 0 for classes whose mass underflows to zero.
                out[name] = -torch.special.xlogy(dist, dist).sum(dim=1)
            elif name == 'energy':
                out[name] = -torch.logsumexp(sem, dim=1)
            elif name == 'rba':
                out[name] = -torch.tanh(sem).sum(dim=1)
        del sem
    if 'maxlogit' in names:
        out['maxlogit'] = -torch.einsum('bqk,bqp->bkp', logits, sig).amax(dim=1)
    if 'eam' in names:
        out['eam'] = 1.0 - torch.einsum('bq,bqp->bp', best_prob, sig)
    return out


def compute_anomaly_scores(class_logits: Tensor, mask_logits: Tensor,
                           names: Union[str, Iterable[str]],
                           chunk_pixels: int = _DEFAULT_CHUNK_PIXELS) -> Dict[str, Tensor]:
    """Computes several anomaly scores in one pass over the pixels.

    The mask logits must already be at the resolution the scores are evaluated at (the label
    resolution): scores are non-linear in the mask logits, so upsampling a score map is not the
    same as scoring upsampled mask logits. Everything is computed in float32 whatever the input
    dtype, pixel chunk by pixel chunk so the ``[B, K, pixels]`` intermediates stay bounded.

    Args:
        class_logits: ``[B, Q, K+1]`` per-query class logits, last entry = no object.
        mask_logits: ``[B, Q, H, W]`` per-query mask logits.
        names: a score name or names among :data:`SCORE_NAMES` (case-insensitive).
        chunk_pixels: number of pixels processed at a time (memory bound, not a result knob).

    Returns:
        dict name -> ``[B, H, W]`` float32 tensor (higher = more anomalous), in the order given.

    Raises:
        ValueError: unknown score name (the message lists the valid ones) or bad shapes.
    """
    names = check_score_names(names)
    _check_shapes(class_logits, mask_logits)
    if chunk_pixels < 1:
        raise ValueError(f'chunk_pixels must be >= 1, got {chunk_pixels}')
    b, q, h, w = mask_logits.shape
    logits_all = class_logits.float()
    probs = logits_all.softmax(-1)[..., :-1]
    logits = logits_all[..., :-1]
    best_prob = probs.amax(dim=-1)
    flat = mask_logits.reshape(b, q, h * w)
    outs = {name: torch.empty(b, h * w, dtype=torch.float32, device=mask_logits.device)
            for name in names}
    # Only a chunk of the sigmoid is alive at a time; the output maps are the only full-size
    # allocations besides the caller's own mask logits.
    for start in range(0, h * w, chunk_pixels):
        stop = min(start + chunk_pixels, h * w)
        sig = flat[..., start:stop].float().sigmoid()
        for name, value in scores_on_chunk(names, probs, logits, best_prob, sig).items():
            outs[name][:, start:stop] = value
    return {name: value.view(b, h, w) for name, value in outs.items()}
