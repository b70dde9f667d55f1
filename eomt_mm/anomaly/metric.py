"""``AnomalyMetric``: pooled pixel anomaly metrics (and optional component metrics) for mmseg.

mmseg's ``IoUMetric`` cannot express pooled ranking metrics, hence this metric. It reads, per data
sample, ``anomaly_scores`` (one ``[1, H, W]`` float32 field per score name, written by
``EoMT.predict``) and ``gt_sem_seg`` (0 = inlier, 1 = anomaly, 255 = void) and reports, for each
score name, ``'{score}/AuPRC'``, ``'{score}/FPR95'`` and ``'{score}/AUROC'`` in percent.

Memory: ``process`` keeps, per image and score, only two float32 arrays (scores of the anomaly
pixels and of the inlier pixels); no label array, no float64, no Python object per pixel. The
pooled metrics are functions of these two multisets only, so the order in which mmengine's
``collect_results`` hands the per-image results over (single process or any number of ranks)
cannot change a single bit of the result.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmseg.registry import METRICS

from .component_metrics import (aggregate_component_stats, frame_component_stats,
                                track_size_filters)
from .pixel_metrics import pooled_pixel_metrics
from .scores import check_score_names


def _get(container: Any, key: str) -> Any:
    """Field of a data sample given as a dict (mmengine's evaluator) or a data element."""
    if isinstance(container, dict):
        return container.get(key)
    return getattr(container, key, None)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.float()  # numpy has no bfloat16; half/bf16 scores widen exactly
        return value.cpu().numpy()
    return np.asarray(value)


def _drop_channel(array: np.ndarray) -> np.ndarray:
    """[1, H, W] -> [H, W] (PixelData keeps a channel axis); other shapes unchanged."""
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _pixel_data_fields(element: Any) -> Dict[str, Any]:
    """name -> array of a PixelData given as a dict or a data element."""
    if element is None:
        return {}
    # dict.items() and BaseDataElement.items() both give (name, value) pairs.
    return {k: v for k, v in element.items() if isinstance(v, (torch.Tensor, np.ndarray))}


@METRICS.register_module()
class AnomalyMetric(BaseMetric):
    """Pooled pixel-level anomaly metrics over a whole dataset.

    Args:
        score_names: anomaly score fields to evaluate (e.g. ``['msp', 'rba']``); ``None``
            evaluates every field found in the first sample's ``anomaly_scores``.
        ignore_index: void label in ``gt_sem_seg``.
        tpr_level: TPR level of the FPR metric (0.95 -> key ``FPR95``).
        component_metrics: also compute SegmentMeIfYouCan sIoU / PPV / mean F1 (keeps every
            score map of ``component_scores`` in memory until the end: float32 per pixel).
        track: 'anomaly' (components >= 500 px, GT >= 100 px) or 'obstacle' (50 / 10 px).
        component_scores: score names for the component metrics (default: all evaluated).
        collect_device: 'cpu' or 'gpu' (mmengine's result collection across ranks).
        prefix: optional prefix of the metric keys.
        collect_dir: directory for CPU collection across ranks (mmengine).
    """

    def __init__(self,
                 score_names: Optional[Sequence[str]] = None,
                 ignore_index: int = 255,
                 tpr_level: float = 0.95,
                 component_metrics: bool = False,
                 track: str = 'anomaly',
                 component_scores: Optional[Sequence[str]] = None,
                 collect_device: str = 'cpu',
                 prefix: Optional[str] = None,
                 collect_dir: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix, collect_dir=collect_dir)
        self.score_names = check_score_names(score_names) if score_names is not None else None
        if not 0.0 < tpr_level <= 1.0:
            raise ValueError(f'tpr_level must be in (0, 1], got {tpr_level}')
        self.ignore_index = int(ignore_index)
        self.tpr_level = float(tpr_level)
        self.component_metrics = bool(component_metrics)
        self.track = track
        self.min_pred_size, self.min_gt_size = track_size_filters(track)
        self.component_scores = (check_score_names(component_scores)
                                 if component_scores is not None else None)
        if self.component_scores and self.score_names:
            extra = [n for n in self.component_scores if n not in self.score_names]
            if extra:
                raise ValueError(f'component_scores {extra} are not among score_names '
                                 f'{self.score_names}')
        tpr_pct = self.tpr_level * 100
        self.fpr_key = f'FPR{tpr_pct:g}'

    # ------------------------------------------------------------------ per batch
    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Keeps the anomaly / inlier scores of every evaluated score of each sample.

        Args:
            data_batch: the loader's batch (unused).
            data_samples: the model's outputs (dicts or SegDataSample) with ``anomaly_scores``
                and ``gt_sem_seg``.
        """
        for sample in data_samples:
            path = _get(_get(sample, 'metainfo') or {}, 'img_path') or _get(sample, 'img_path')
            where = f' (image {path})' if path else ''
            scores = _pixel_data_fields(_get(sample, 'anomaly_scores'))
            if not scores:
                raise KeyError('AnomalyMetric needs data_sample.anomaly_scores; set the model\'s '
                               f'test_cfg anomaly_scores=[...]{where}')
            names = self.score_names
            if names is None:
                # First sample fixes the list so every image contributes the same scores.
                names = self.score_names = check_score_names(list(scores))
            gt_field = _get(sample, 'gt_sem_seg')
            gt_data = _get(gt_field, 'data') if gt_field is not None else None
            if gt_data is None:
                raise KeyError(f'AnomalyMetric needs data_sample.gt_sem_seg{where}')
            gt = _drop_channel(_to_numpy(gt_data))
            pos_mask = gt == 1
            neg_mask = gt == 0
            bad = ~(pos_mask | neg_mask | (gt == self.ignore_index))
            if bad.any():
                found = np.unique(gt[bad])[:10].tolist()
                raise ValueError(f'ground truth{where} has labels {found}; expected 0 (inlier), '
                                 f'1 (anomaly), {self.ignore_index} (void)')
            result: Dict[str, Any] = {'pixels': {}}
            comp_names = (self.component_scores or names) if self.component_metrics else []
            for name in names:
                if name not in scores:
                    raise KeyError(f'anomaly score {name!r} missing from anomaly_scores{where}; '
                                   f'present: {sorted(scores)}')
                score = _drop_channel(_to_numpy(scores[name]))
                if score.shape != gt.shape:
                    raise ValueError(f'anomaly score {name!r} has shape {score.shape} but the '
                                     f'label has {gt.shape}{where}: scores must be computed at '
                                     'label resolution')
                # Scores are compared at the float32 precision they are computed in.
                score = score.astype(np.float32, copy=False)
                if not np.isfinite(score).all():
                    raise ValueError(f'anomaly score {name!r} has NaN/inf values{where}')
                result['pixels'][name] = (score[pos_mask], score[neg_mask])
                if name in comp_names:
                    result.setdefault('maps', {})[name] = score.copy()
            if self.component_metrics:
                result['label'] = gt.astype(np.uint8)
            self.results.append(result)

    # ------------------------------------------------------------------ whole dataset
    def compute_metrics(self, results: List[Dict[str, Any]]) -> Dict[str, float]:
        """Pools all pixels and computes the metrics.

        Args:
            results: per-image results from :meth:`process` (all ranks, any order).

        Returns:
            dict ``'{score}/AuPRC'``, ``'{score}/FPR95'``, ``'{score}/AUROC'`` (percent) and, with
            component metrics, ``'{score}/sIoU'``, ``'{score}/PPV'``, ``'{score}/mean_F1'``.
        """
        if not results:
            raise ValueError('AnomalyMetric received no results')
        names = list(results[0]['pixels'])
        metrics: Dict[str, float] = {}
        rows = []
        for name in names:
            # One preallocated buffer per class: the only full-size copy of the pixels.
            n_pos = sum(r['pixels'][name][0].size for r in results)
            n_neg = sum(r['pixels'][name][1].size for r in results)
            pos = np.empty(n_pos, dtype=np.float32)
            neg = np.empty(n_neg, dtype=np.float32)
            i = j = 0
            for r in results:
                p, n = r['pixels'][name]
                pos[i:i + p.size] = p
                neg[j:j + n.size] = n
                i += p.size
                j += n.size
            pix = pooled_pixel_metrics(pos, neg, tpr_level=self.tpr_level, in_place=True)
            del pos, neg
            if pix.num_pos == 0 or pix.num_neg == 0:
                print_log(f'AnomalyMetric: score {name!r} saw {pix.num_pos} anomaly and '
                          f'{pix.num_neg} inlier pixels; metrics needing both are NaN',
                          logger='current', level=logging.WARNING)
            metrics[f'{name}/AuPRC'] = pix.auprc * 100
            metrics[f'{name}/{self.fpr_key}'] = pix.fpr_at_tpr * 100
            metrics[f'{name}/AUROC'] = pix.auroc * 100
            row = [name, pix.auprc * 100, pix.fpr_at_tpr * 100, pix.auroc * 100]
            if self.component_metrics and 'maps' in results[0] and name in results[0]['maps']:
                frames = [frame_component_stats(r['maps'][name], r['label'],
                                                pix.best_f1_threshold, self.min_pred_size,
                                                self.min_gt_size, self.ignore_index)
                          for r in results]
                comp = aggregate_component_stats(frames)
                for key in ('sIoU', 'PPV', 'mean_F1'):
                    metrics[f'{name}/{key}'] = comp[key] * 100
                row += [comp['sIoU'] * 100, comp['PPV'] * 100, comp['mean_F1'] * 100]
            rows.append(row)
        header = ['score', 'AuPRC', self.fpr_key, 'AUROC']
        if any(len(r) > 4 for r in rows):
            header += ['sIoU', 'PPV', 'mean_F1']
        print_log('\n' + format_table(header, rows), logger='current')
        return metrics


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table (floats with 2 decimals) for logs.

    Args:
        header: column names.
        rows: rows of cells (str or float).

    Returns:
        The table as one string.
    """
    cells = [[str(h) for h in header]]
    for row in rows:
        cells.append([f'{v:.2f}' if isinstance(v, float) else str(v) for v in row])
    widths = [max(len(r[c]) if c < len(r) else 0 for r in cells) for c in range(len(header))]
    lines = []
    for k, row in enumerate(cells):
        lines.append(' | '.join(v.rjust(w) if k else v.ljust(w) for v, w in zip(row, widths)))
        if k == 0:
            lines.append('-+-'.join('-' * w for w in widths))
    return '\n'.join(lines)
