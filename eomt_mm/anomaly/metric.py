"""``AnomalyMetric``: pooled pixel anomaly metrics and component metrics for mmseg, two protocols.

mmseg's ``IoUMetric`` cannot express pooled ranking metrics, hence this metric. It reads, per data
sample, ``anomaly_scores`` (one ``[1, H, W]`` float32 field per score name, written by
``AnomalyEoMT.predict``) and ``gt_sem_seg`` (0 = inlier, 1 = anomaly, 255 = void).

Protocols (``protocol=``, one or both in the same pass over the data):

* ``'exact'`` (default): all labelled pixels of the dataset pooled, scikit-learn's
  ``average_precision_score`` / ``roc_curve`` / ``roc_auc_score`` semantics (research code's
  protocol), keys ``'{score}/AuPRC'``, ``'{score}/FPR95'``, ``'{score}/AUROC'``; component metrics
  at the exact best-F1 threshold.
* ``'smiyc'``: the SegmentMeIfYouCan benchmark's own evaluator (per-frame binned confusion
  matrices merged over the dataset, component metrics at its best-F1 threshold, its
  region-of-interest rules), keys ``'smiyc/{score}/...'``.

Memory does not grow with the dataset: each frame is reduced on arrival and spilled to a private
temporary folder (``spill_dir``), which is removed when the evaluation ends or fails. The exact
pixel metrics merge the spilled sorted runs in bounded chunks (:mod:`.exact_store`); the component
metrics, whose threshold is known only at the end, re-read one spilled score map at a time.

Ranks: each rank spills its own frames; :meth:`AnomalyMetric.evaluate` exchanges bounded merged
chunks and per-frame component statistics (never pixels) and drops the sampler's padding exactly
as mmengine's ``collect_results`` does, so every number is the same whatever the number of ranks.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine import dist
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmseg.registry import METRICS

from .component_metrics import (aggregate_component_stats, frame_component_stats,
                                track_size_filters)
from .exact_store import MAX_ENTRIES, Exchange, exact_pixel_metrics, spill_sorted_runs
from .metric_inputs import frame_name, sample_arrays
from .scores import check_evaluated_score_names
from .smiyc_protocol import COMPONENT_KEYS, SmiycProtocol
from .spill import SpillFolder, read_segment

__all__ = ['AnomalyMetric', 'PROTOCOLS', 'format_table']

#: Evaluation protocols of :class:`AnomalyMetric`.
PROTOCOLS = ('exact', 'smiyc')


def check_protocols(protocol: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """Validated protocol names (a name or a list of names, no duplicates).

    Args:
        protocol: ``'exact'``, ``'smiyc'`` or a sequence of them.

    Returns:
        Tuple of protocol names in the given order.
    """
    names = (protocol, ) if isinstance(protocol, str) else tuple(protocol)
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f'protocol must be one of {list(PROTOCOLS)} or a list of distinct '
                         f'ones, got {protocol!r}')
    return names


def _refuse_unlabelled(sample: Any) -> None:
    """Stops at a frame without ground truth (an images-only split, e.g. SMIYC test frames).

    Refused rather than skipped: figures over the labelled part of a dataset would be reported
    as the dataset's, and a whole images-only split would give an empty table that reads like a
    result. Such frames only get test-server files (``tools/eval_anomaly.py --smiyc-submission``).
    """
    label = sample.get('gt_sem_seg') if isinstance(sample, dict) else getattr(
        sample, 'gt_sem_seg', None)
    if label is None:
        raise ValueError(f'AnomalyMetric: frame {frame_name(sample) or "<unknown>"} has no label '
                         '(gt_sem_seg); frames of an images-only split (labelled=False, '
                         "SMIYCDataset split='test') have no metrics: evaluate a labelled split, "
                         'or write their SegmentMeIfYouCan files with tools/eval_anomaly.py '
                         '--smiyc-submission DIR (the pipeline of a labelled split needs '
                         'LoadAnnotations)')


class _DistExchange(Exchange):
    """:class:`.exact_store.Exchange` over mmengine's process group."""

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        dist.all_reduce(tensor, op='sum')
        return tensor.numpy()

    def all_gather(self, obj: Any) -> List[Any]:
        return dist.all_gather_object(obj)


@METRICS.register_module()
class AnomalyMetric(BaseMetric):
    """Pooled pixel-level and component-level anomaly metrics over a whole dataset.

    Args:
        score_names: anomaly score fields to evaluate (e.g. ``['msp', 'rba']``); ``None``
            evaluates every field found in the first sample's ``anomaly_scores``.
        ignore_index: void label in ``gt_sem_seg``.
        tpr_level: TPR level of the FPR metric (0.95 -> key ``FPR95``).
        component_metrics: also compute SegmentMeIfYouCan sIoU / PPV / mean F1 (and F1 at
            0.25 / 0.5 / 0.75) at each protocol's best-F1 threshold. The score maps of
            ``component_scores`` are spilled to ``spill_dir`` (4 bytes per pixel) until then.
        track: SegmentMeIfYouCan track: 'anomaly' (components >= 500 px, GT >= 100 px) or
            'obstacle' (50 / 10 px).
        component_scores: score names for the component metrics (default: all evaluated).
        protocol: ``'exact'``, ``'smiyc'`` or both (``('exact', 'smiyc')``), see the module
            docstring.
        smiyc_float16: the ``smiyc`` protocol bins float16 scores, as the test server reads a
            submission (``False``: the float32 scores as computed).
        spill_dir: folder in which the temporary evaluation folder is made (default: the system
            temporary folder). Needs at most 4 bytes per labelled pixel and score (less with
            ties), plus 4 bytes per pixel and component score and 1 per pixel for the component
            metrics, until the evaluation ends.
        merge_chunk_entries: entries merged per step of the exact protocol (bounds its memory
            at about 40 bytes each).
        collect_device: 'cpu' or 'gpu' (kept for mmengine; results never travel as pixels).
        prefix: optional prefix of the metric keys.
        collect_dir: kept for mmengine's interface (unused: nothing large is collected).
    """

    def __init__(self,
                 score_names: Optional[Sequence[str]] = None,
                 ignore_index: int = 255,
                 tpr_level: float = 0.95,
                 component_metrics: bool = False,
                 track: str = 'anomaly',
                 component_scores: Optional[Sequence[str]] = None,
                 protocol: Union[str, Sequence[str]] = 'exact',
                 smiyc_float16: bool = True,
                 spill_dir: Optional[str] = None,
                 merge_chunk_entries: int = MAX_ENTRIES,
                 collect_device: str = 'cpu',
                 prefix: Optional[str] = None,
                 collect_dir: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix, collect_dir=collect_dir)
        self.score_names = (check_evaluated_score_names(score_names)
                            if score_names is not None else None)
        if not 0.0 < tpr_level <= 1.0:
            raise ValueError(f'tpr_level must be in (0, 1], got {tpr_level}')
        self.ignore_index = int(ignore_index)
        self.tpr_level = float(tpr_level)
        self.component_metrics = bool(component_metrics)
        self.track = track
        self.min_pred_size, self.min_gt_size = track_size_filters(track)
        self.component_scores = (check_evaluated_score_names(component_scores)
                                 if component_scores is not None else None)
        if self.component_scores and self.score_names:
            extra = [n for n in self.component_scores if n not in self.score_names]
            if extra:
                raise ValueError(f'component_scores {extra} are not among score_names '
                                 f'{self.score_names}')
        self.protocols = check_protocols(protocol)
        self.smiyc = (SmiycProtocol(track=track, tpr_level=tpr_level, float16=smiyc_float16)
                      if 'smiyc' in self.protocols else None)
        if int(merge_chunk_entries) < 1:
            raise ValueError(f'merge_chunk_entries must be >= 1, got {merge_chunk_entries}')
        self.merge_chunk_entries = int(merge_chunk_entries)
        self.fpr_key = f'FPR{self.tpr_level * 100:g}'
        self._spill = SpillFolder(spill_dir)
        #: Rows of the last evaluation's tables (protocol, score, frames, pixels, metrics).
        self.last_tables: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ per batch
    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Reduces each sample to spilled runs / maps and keeps a small record per frame.

        Args:
            data_batch: the loader's batch (unused).
            data_samples: the model's outputs (dicts or SegDataSample) with ``anomaly_scores``
                and ``gt_sem_seg``.
        """
        try:
            for sample in data_samples:
                self.results.append(self._process_one(sample))
        except BaseException:
            self._reset()  # the evaluation cannot go on: nothing spilled may stay on disk
            raise

    def _process_one(self, sample: Any) -> Dict[str, Any]:
        _refuse_unlabelled(sample)
        scores, gt, names = sample_arrays(sample, self.score_names, self.ignore_index)
        self.score_names = names  # the first sample fixes the list when none was given
        where = frame_name(sample)
        pos_mask, neg_mask = gt == 1, gt == 0
        comp_names = (self.component_scores or names) if self.component_metrics else []
        record: Dict[str, Any] = {'index': len(self.results), 'frame': where, 'shape': gt.shape,
                                  'exact': {}, 'smiyc': {}, 'maps': {}}
        for name in names:
            score = scores[name]
            if 'exact' in self.protocols:
                record['exact'][name] = (
                    spill_sorted_runs(self._spill, score[pos_mask], f'{name}_pos'),
                    spill_sorted_runs(self._spill, score[neg_mask], f'{name}_neg'))
            if self.smiyc is not None:
                try:
                    record['smiyc'][name] = self.smiyc.process_frame(score, gt,
                                                                     self.ignore_index)
                except ValueError as err:  # e.g. scores beyond float16's range
                    raise ValueError(f'protocol smiyc, score {name!r}, image {where}: {err}; '
                                     'rescale the score or set smiyc_float16=False') from None
            if name in comp_names:
                record['maps'][name] = self._spill.append(f'{name}_map', score)
        if comp_names:
            void_as_255 = np.where(pos_mask, 1, np.where(neg_mask, 0, 255)).astype(np.uint8)
            record['label'] = self._spill.append('label', void_as_255)
        return record

    @property
    def spilled_bytes(self) -> int:
        """Bytes of this evaluation spilled to disk so far."""
        return self._spill.nbytes

    def _reset(self) -> None:
        self.results.clear()
        self._spill.close()

    # ------------------------------------------------------------------ whole dataset
    def evaluate(self, size: int) -> Dict[str, float]:
        """Metrics of all processed frames (every rank), then the spill folder is removed.

        Args:
            size: dataset length (frames beyond it are the distributed sampler's padding).

        Returns:
            The metrics (identical on every rank).
        """
        try:
            rank, world_size = dist.get_dist_info()
            if world_size == 1:
                return super().evaluate(size)
            # The sampler gives rank r the dataset items r, r + W, ... and pads the tail with
            # repeats; mmengine's collect_results interleaves the ranks and cuts at `size`:
            # item i of rank r is global position i * W + r, kept when below `size`.
            kept = [r for r in self.results if r['index'] * world_size + rank < size]
            order = [r['index'] * world_size + rank for r in kept]
            metrics = self._compute(kept, order, _DistExchange())
            if self.prefix:
                metrics = {f'{self.prefix}/{k}': v for k, v in metrics.items()}
            return metrics
        finally:
            self._reset()

    def compute_metrics(self, results: List[Dict[str, Any]]) -> Dict[str, float]:
        """Metrics of per-frame records (one process; records of several metric objects on
        this machine may be mixed, in any order).

        Args:
            results: per-frame records from :meth:`process`.

        Returns:
            dict ``'{score}/AuPRC'``, ``'{score}/FPR95'``, ``'{score}/AUROC'`` (percent) and, with
            component metrics, ``'{score}/sIoU'``, ``'{score}/PPV'``, ``'{score}/mean_F1'``,
            ``'{score}/F1@0.25'`` ...; the ``smiyc`` protocol's keys start with ``'smiyc/'``.
        """
        if not results:
            raise ValueError('AnomalyMetric received no results: the test loop processed no '
                             'frame (empty dataset?)')
        return self._compute(results, list(range(len(results))), Exchange())

    def _compute(self, results: List[Dict[str, Any]], order: List[int],
                 exchange: Exchange) -> Dict[str, float]:
        names = self.score_names or list(results[0]['exact'] or results[0]['smiyc'])
        frames = int(exchange.all_sum(np.array([len(results)]))[0])
        if frames == 0:
            raise ValueError('AnomalyMetric received no results on any rank')
        metrics: Dict[str, float] = {}
        self.last_tables = []
        for protocol in self.protocols:
            for name in names:
                row = self._protocol_row(protocol, name, results, order, exchange)
                row.update(frames=frames)
                self.last_tables.append(row)
                key = f'{name}/' if protocol == 'exact' else f'smiyc/{name}/'
                metrics.update({key + k: v for k, v in row['metrics'].items()})
        self._log_tables()
        return metrics

    def _protocol_row(self, protocol: str, name: str, results: List[Dict[str, Any]],
                      order: List[int], exchange: Exchange) -> Dict[str, Any]:
        comp = self.component_metrics and (self.component_scores is None
                                           or name in self.component_scores)
        if protocol == 'exact':
            pix = exact_pixel_metrics([r['exact'][name][0] for r in results],
                                      [r['exact'][name][1] for r in results],
                                      tpr_level=self.tpr_level,
                                      max_entries=self.merge_chunk_entries, exchange=exchange)
            values = {'AuPRC': pix.auprc * 100, self.fpr_key: pix.fpr_at_tpr * 100,
                      'AUROC': pix.auroc * 100}
            num_pos, num_neg, threshold = pix.num_pos, pix.num_neg, pix.best_f1_threshold
            components = (self._exact_components(name, threshold, results, order, exchange)
                          if comp else None)
        else:
            frame_results = [r['smiyc'][name] for r in results]
            gathered = exchange.gather_in_order(frame_results, order)
            maps = [(r['maps'][name], r['label'], r['shape']) for r in results] if comp else None
            out = self.smiyc.compute(gathered, maps, order, exchange, self.fpr_key)
            values, num_pos, num_neg, threshold, components = out
        if num_pos == 0 or num_neg == 0:
            print_log(f'AnomalyMetric ({protocol}): score {name!r} saw {num_pos} anomaly and '
                      f'{num_neg} inlier pixels; metrics needing both are NaN',
                      logger='current', level=logging.WARNING)
        if components is not None:
            values.update({k: components[k] * 100 for k in COMPONENT_KEYS})
        return {'protocol': protocol, 'score': name, 'anomaly_pixels': num_pos,
                'labelled_pixels': num_pos + num_neg, 'threshold': threshold, 'metrics': values}

    def _exact_components(self, name: str, threshold: float, results: List[Dict[str, Any]],
                          order: List[int], exchange: Exchange) -> Dict[str, float]:
        """Component metrics at ``threshold``, one spilled score map in memory at a time."""
        local = []
        for record in results:
            shape = record['shape']
            score = read_segment(record['maps'][name]).reshape(shape)
            label = read_segment(record['label']).reshape(shape)
            local.append(frame_component_stats(score, label, threshold, self.min_pred_size,
                                               self.min_gt_size, ignore_index=255))
        return aggregate_component_stats(exchange.gather_in_order(local, order))

    def _log_tables(self) -> None:
        header = ['protocol', 'score', 'AuPRC', self.fpr_key, 'AUROC']
        if self.component_metrics:
            header += ['sIoU', 'PPV', 'mean_F1']
        rows = [[t['protocol'], t['score']] + [t['metrics'].get(k, float('nan'))
                                               for k in header[2:]] for t in self.last_tables]
        first = self.last_tables[0]
        print_log(f'\nframes: {first["frames"]}, labelled pixels: {first["labelled_pixels"]:,} '
                  f'({first["anomaly_pixels"]:,} anomaly)\n' + format_table(header, rows),
                  logger='current')


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
