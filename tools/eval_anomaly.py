"""Evaluate one checkpoint on several anomaly benchmarks and print one table.

Example (the five public validation folders under data/anomaly/)::

    python tools/eval_anomaly.py CONFIG CHECKPOINT \
        --datasets road_anomaly21 road_obstacle21 road_anomaly fs_static fs_lost_found \
        --data-root data/anomaly --scores msp maxlogit rba --out-dir work_dirs/anomaly_eval \
        --protocol exact smiyc

Each name selects ``configs/_base_/datasets/anomaly_<name>.py`` (its dataloader, pipeline,
``AnomalyMetric``, split name and SegmentMeIfYouCan folder name); ``--data-root`` replaces the
parent folder of the config's ``data_root``. A custom dataset config can be given as
``name=path/to/config.py``. The model is built and the checkpoint loaded once; each dataset is
inferred once, and every protocol of ``--protocol`` is computed from that one pass:

* ``exact``: all labelled pixels pooled, scikit-learn's definitions (research papers' numbers);
* ``smiyc``: the SegmentMeIfYouCan benchmark's own evaluator (binned per frame; the
  leaderboard's numbers).

Rows of the table are protocol x dataset x score, with the split, the number of frames and of
labelled pixels, then AuPRC, FPR95, AUROC (and sIoU, PPV, mean F1 with ``--component-metrics``).
The table is also written as ``anomaly.csv`` and ``anomaly.json`` in ``--out-dir``.
``--show-dir DIR`` saves, per image, the image, the anomaly heat map and the ground truth side by
side under ``DIR/<dataset>/``. ``--smiyc-submission DIR`` also writes the score files the
SegmentMeIfYouCan test server takes (one HDF5 file per frame of ``--smiyc-score``, under
``DIR/anomaly_p/<method>/<benchmark folder>/``) for the datasets that belong to the benchmark, and
prints what to upload; ``DIR`` must be new or empty (checked before any inference).

The test server's frames have hidden labels. Their dataset configs read them images-only
(``labelled=False``, a pipeline without ``LoadAnnotations``): ``smiyc_anomaly_track_test`` (the
Anomaly Track's 100 test frames) and ``smiyc_obstacle_track_test`` (the Obstacle Track's 452
frames of ``ObstacleTrack-all``, validation scene included). Such a dataset needs ``--smiyc-submission``: it is inferred,
its files are written and, having no labels, it gets no metrics (no table row; the tool says so);
labelled datasets of the same run are evaluated as usual. The complete submission::

    python tools/eval_anomaly.py CONFIG CHECKPOINT --data-root data/anomaly \
        --datasets smiyc_anomaly_track smiyc_anomaly_track_test smiyc_obstacle_track_test \
        lost_and_found --scores rba --smiyc-submission work_dirs/smiyc_upload

(``AnomalyTrack-all`` = its 10 validation + 100 test frames, ``ObstacleTrack-all``,
``LostAndFound-test``); frame names must be unique per benchmark folder (checked up front).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import os.path as osp
import sys
from typing import Any, Dict, List, NamedTuple, Optional

_REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmseg.registry import DATASETS  # noqa: E402

import eomt_mm.engine.safe_checkpoint_install  # noqa: E402,F401  (installs safe checkpointing)
from eomt_mm.anomaly.component_metrics import TRACK_SIZE_FILTERS  # noqa: E402
from eomt_mm.anomaly.metric import PROTOCOLS, check_protocols, format_table  # noqa: E402
from eomt_mm.anomaly.scores import check_evaluated_score_names  # noqa: E402
from eomt_mm.anomaly.smiyc.submission import SubmissionWriter  # noqa: E402
from eomt_mm.anomaly.visualization import AnomalyVisHook  # noqa: E402

DATASET_CONFIG_DIR = osp.join(_REPO_ROOT, 'configs', '_base_', 'datasets')
PIXEL_COLUMNS = ('AuPRC', 'FPR95', 'AUROC')
COMPONENT_COLUMNS = ('sIoU', 'PPV', 'mean_F1')
INFO_COLUMNS = ('protocol', 'dataset', 'split', 'score', 'frames', 'labelled_pixels')


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description='Evaluate anomaly segmentation benchmarks')
    parser.add_argument('config', help='model config (an EoMT config)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--datasets', nargs='+', required=True,
                        help='benchmark names (anomaly_<name>.py; the *_test ones are the '
                             "test server's images-only frames) or name=config.py")
    parser.add_argument('--data-root', help='folder holding the benchmark folders')
    parser.add_argument('--scores', nargs='+', default=['msp', 'maxlogit', 'rba'],
                        help='anomaly scores to evaluate side by side')
    parser.add_argument('--protocol', nargs='+', default=['exact'], choices=PROTOCOLS,
                        help='exact (pooled pixels, scikit-learn semantics) and/or smiyc (the '
                             'SegmentMeIfYouCan evaluator); both come from one inference')
    parser.add_argument('--track', choices=sorted(TRACK_SIZE_FILTERS),
                        help='SegmentMeIfYouCan track of the component metrics (default: each '
                             "dataset config's)")
    parser.add_argument('--component-metrics', action='store_true',
                        help='also compute SegmentMeIfYouCan sIoU / PPV / mean F1')
    parser.add_argument('--spill-dir',
                        help='folder for the temporary evaluation files (default: system temp)')
    parser.add_argument('--smiyc-submission', metavar='DIR',
                        help='also write SegmentMeIfYouCan test-server score files under DIR')
    parser.add_argument('--smiyc-score', help='score written by --smiyc-submission '
                                              '(default: the first of --scores)')
    parser.add_argument('--smiyc-method',
                        help='method folder name of the submission (default: config name)')
    parser.add_argument('--out-dir', default='work_dirs/anomaly_eval',
                        help='where anomaly.csv / anomaly.json and the logs go')
    parser.add_argument('--show-dir',
                        help='save image | heat map | ground truth PNGs under DIR/<dataset>/')
    parser.add_argument('--show-score', help='score painted by --show-dir (default: the first)')
    parser.add_argument('--max-show', type=int, help='pictures per dataset (default: all)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the model config, key=value')
    return parser.parse_args(argv)


def dataset_configs(specs: List[str]) -> Dict[str, str]:
    """name -> dataset config path; errors name the missing file."""
    out = {}
    for spec in specs:
        name, _, path = spec.partition('=')
        path = path or osp.join(DATASET_CONFIG_DIR, f'anomaly_{name}.py')
        if not osp.isfile(path):
            known = sorted(f[len('anomaly_'):-3] for f in os.listdir(DATASET_CONFIG_DIR)
                           if f.startswith('anomaly_'))
            raise FileNotFoundError(f'dataset config {path} for {name!r} does not exist; '
                                    f'known names: {", ".join(known)}')
        out[name] = path
    return out


class EvaluationPart(NamedTuple):
    """One benchmark of the run: what to infer, how to evaluate it, where its frames go."""

    loader: Any  # test dataloader config
    evaluator: Dict[str, Any]  # AnomalyMetric config (unused for an images-only split)
    split: str  # split name printed in the table
    smiyc_name: Optional[str]  # SMIYC submission folder (None: not a benchmark split)
    labelled: bool  # False: images-only split (hidden labels), no metrics
    frames: Dict[str, str]  # image path -> benchmark frame name


def _frame_name(info: Dict[str, Any]) -> str:
    """The benchmark's name of a frame: the anomaly datasets' ``frame_name``, else the image
    file's stem (without LostAndFound's ``_leftImg8bit``) for other mmseg datasets."""
    if info.get('frame_name'):
        return info['frame_name']
    stem = osp.splitext(osp.basename(info['img_path']))[0]
    return stem[:-len('_leftImg8bit')] if stem.endswith('_leftImg8bit') else stem


def evaluation_parts(path: str, args: argparse.Namespace, scores: List[str]) -> EvaluationPart:
    """Test dataloader, evaluator config, split, SMIYC folder, labels and frames of one benchmark.

    The dataset is built here once (a missing folder or label, a partial split, an images-only
    split with ``LoadAnnotations``: errors before the model is loaded); the runner rebuilds it.
    """
    ds_cfg = Config.fromfile(path)
    loader = ds_cfg.test_dataloader
    if args.data_root is not None:
        loader.dataset.data_root = osp.join(args.data_root, osp.basename(
            osp.normpath(loader.dataset.data_root)))
    evaluator = dict(ds_cfg.test_evaluator)
    evaluator.update(score_names=scores, component_metrics=args.component_metrics,
                     protocol=list(args.protocol))
    if args.track is not None:
        evaluator['track'] = args.track
    if args.spill_dir is not None:
        evaluator['spill_dir'] = args.spill_dir
    split = ds_cfg.get('dataset_split', loader.dataset.get('split', 'unknown'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        dataset = DATASETS.build(copy.deepcopy(loader.dataset))
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    return EvaluationPart(loader, evaluator, split, ds_cfg.get('smiyc_submission_name'),
                          bool(getattr(dataset, 'labelled', True)),
                          {info['img_path']: _frame_name(info) for info in infos})


def check_submission_plan(parts: Dict[str, EvaluationPart], writer: Any) -> None:
    """Before inference: images-only splits have a folder, frame names are valid and unique.

    Args:
        parts: the run's benchmarks by name.
        writer: the :class:`SubmissionWriter` (None without ``--smiyc-submission``).
    """
    owner: Dict[tuple, str] = {}
    for name, part in parts.items():
        if not part.labelled and writer is None:
            raise ValueError(f'{name} ({part.split}) is an images-only split (no labels), so it '
                             'has no metrics; add --smiyc-submission DIR to write its '
                             'SegmentMeIfYouCan test-server files, or evaluate a labelled split')
        if not part.labelled and part.smiyc_name is None:
            raise ValueError(f'{name} ({part.split}) is an images-only split but its config sets '
                             'no smiyc_submission_name: nothing can be done with it')
        if writer is None or part.smiyc_name is None:
            continue
        for frame in part.frames.values():
            writer.path_for(part.smiyc_name, frame)  # a name the benchmark's paths accept
            other = owner.setdefault((part.smiyc_name, frame), name)
            if other != name:
                raise ValueError(f'frame {frame!r} of {part.smiyc_name} is in both {other} and '
                                 f'{name}; each frame must be written once (drop one of them '
                                 'from --datasets)')


class SubmissionHook(Hook):
    """Writes each test sample's score map with a :class:`SubmissionWriter` after inference.

    Args:
        writer: the submission writer (its folder was checked before inference).
        score: the score written.
    """

    def __init__(self, writer: Any, score: str) -> None:
        self.writer = writer
        self.score = score
        self.dataset: Optional[str] = None  # SMIYC folder of the dataset being inferred
        self.frames: Dict[str, str] = {}  # its image paths -> benchmark frame names

    def start(self, dataset: Optional[str], frames: Dict[str, str]) -> None:
        """Selects the SMIYC folder (None: write nothing) and frame names of the next dataset."""
        self.dataset, self.frames = dataset, frames

    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None,
                        outputs: Optional[List[Any]] = None) -> None:
        """Writes every output of the batch (nothing for non-benchmark datasets)."""
        if self.dataset is None:
            return
        for sample in outputs or []:
            img_path = sample.metainfo['img_path']
            if img_path not in self.frames:
                raise KeyError(f'--smiyc-submission: image {img_path} is not among the frames '
                               f'listed for {self.dataset} before inference')
            frame = self.frames[img_path]
            score = sample.anomaly_scores.get(self.score).detach().float().cpu().numpy()
            self.writer.write(self.dataset, frame, score)


def main(argv=None) -> Dict[str, Dict[str, float]]:
    """Runs every benchmark and returns ``{dataset: {metric key: value}}``."""
    args = parse_args(argv)
    scores = check_evaluated_score_names(args.scores)
    check_protocols(args.protocol)
    datasets = dataset_configs(args.datasets)
    for what, path in (('config', args.config), ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} file {path!r} does not exist')
    parts = {name: evaluation_parts(path, args, scores) for name, path in datasets.items()}
    submission = None
    if args.smiyc_submission:
        # Built (and the folder checked) before the model: a non-empty folder fails at once.
        score = args.smiyc_score or scores[0]
        if score not in scores:
            raise ValueError(f'--smiyc-score {score!r} is not among --scores {scores}')
        if not any(p.smiyc_name for p in parts.values()):
            raise ValueError('--smiyc-submission: none of the datasets belongs to the '
                             'SegmentMeIfYouCan test server (their configs set no '
                             'smiyc_submission_name); evaluate e.g. road_anomaly21, '
                             'road_obstacle21, lost_and_found or the test splits '
                             'smiyc_anomaly_track_test, smiyc_obstacle_track_test')
        method = args.smiyc_method or osp.splitext(osp.basename(args.config))[0]
        submission = SubmissionHook(SubmissionWriter(args.smiyc_submission, method), score)
    check_submission_plan(parts, submission.writer if submission is not None else None)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    # The segmentor computes exactly the scores the metric reads: a plain EoMT config is
    # evaluated by its anomaly-enabled subclass (same weights and state-dict keys).
    if cfg.model.get('type') == 'EoMT':
        cfg.model.type = 'AnomalyEoMT'
    cfg.model.setdefault('test_cfg', {})
    cfg.model.test_cfg['anomaly_scores'] = scores
    cfg.work_dir = args.out_dir
    cfg.load_from = args.checkpoint
    cfg.resume = False
    # The closed-set mIoU on the config's inlier validation set goes next to the anomaly table,
    # so a fine-tune that trades segmentation for anomaly AP shows both.
    inlier = (cfg.val_dataloader, cfg.val_evaluator) if cfg.get('val_dataloader') and \
        cfg.get('val_evaluator') else None
    for key in ('train_dataloader', 'train_cfg', 'optim_wrapper', 'param_scheduler',
                'val_dataloader', 'val_cfg', 'val_evaluator'):
        cfg.pop(key, None)
    first = next(iter(parts.values()))
    cfg.test_dataloader, cfg.test_evaluator = first.loader, first.evaluator
    cfg.test_cfg = dict(type='TestLoop')
    runner = Runner.from_cfg(cfg)
    inlier_miou = None
    if inlier is not None and osp.isdir(inlier[0].dataset.get('data_root', '')):
        # Before the anomaly hooks are registered: they read anomaly labels.
        runner._test_dataloader, runner._test_evaluator = inlier
        inlier_miou = runner.test().get('mIoU')
    vis_hook = None
    if args.show_dir:
        # The first of --scores by name: the hook's own default, the first field of the sample's
        # anomaly_scores, is the first of a set (its order changes between processes).
        vis_hook = AnomalyVisHook(args.show_dir, score_name=args.show_score or scores[0],
                                  max_images=args.max_show)
        runner.register_hook(vis_hook)
    if submission is not None:
        runner.register_hook(submission)

    results: Dict[str, Dict[str, float]] = {}
    rows = []
    for name, part in parts.items():
        # Reuse the built model (and the loaded checkpoint); only the loop is rebuilt.
        runner._test_dataloader = part.loader
        # An images-only split is inferred for its submission files only: no metric at all
        # (AnomalyMetric would refuse its frames, see eomt_mm/anomaly/metric.py).
        runner._test_evaluator = part.evaluator if part.labelled else []
        runner._test_loop = dict(type='TestLoop')
        if vis_hook is not None:
            vis_hook.out_dir = osp.join(args.show_dir, name)
        if submission is not None:
            submission.start(part.smiyc_name, part.frames)
            if part.smiyc_name is None:
                print(f'--smiyc-submission: {name} is not a SegmentMeIfYouCan dataset; '
                      'no score files written for it')
        written = len(submission.writer.frames.get(part.smiyc_name, [])) if submission else 0
        results[name] = runner.test()
        if not part.labelled:
            written = len(submission.writer.frames.get(part.smiyc_name, [])) - written
            print(f'{name} ({part.split}): {written} frames written to {part.smiyc_name}, '
                  'no labels: no metrics')
            continue
        metric = runner.test_loop.evaluator.metrics[0]
        for table in metric.last_tables:
            rows.append(_table_row(table, name, part.split))

    columns = list(PIXEL_COLUMNS) + (list(COMPONENT_COLUMNS) if args.component_metrics else [])
    header = list(INFO_COLUMNS) + columns
    cells = [[r[c] for c in header] for r in rows]
    print(format_table(header, cells) if cells else
          'no labelled dataset in this run: no metric table')
    if inlier_miou is not None:
        print(f'inlier (closed-set) mIoU on the config\'s validation set: {inlier_miou:.2f}')
        results['inlier'] = {'mIoU': inlier_miou}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(osp.join(args.out_dir, 'anomaly.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)
    with open(osp.join(args.out_dir, 'anomaly.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    if submission is not None:
        print(submission.writer.upload_instructions())
    return results


def _table_row(table: Dict[str, Any], dataset: str, split: str) -> Dict[str, Any]:
    """One output row from a row of ``AnomalyMetric.last_tables``."""
    row = {'protocol': table['protocol'], 'dataset': dataset, 'split': split,
           'score': table['score'], 'frames': table['frames'],
           'labelled_pixels': table['labelled_pixels']}
    for column in PIXEL_COLUMNS + COMPONENT_COLUMNS:
        row[column] = table['metrics'].get(column, float('nan'))
    return row


if __name__ == '__main__':
    main()
