"""Evaluate one checkpoint on several anomaly benchmarks and print one table.

Example (the five public validation folders under data/anomaly/)::

    python tools/eval_anomaly.py CONFIG CHECKPOINT \
        --datasets road_anomaly21 road_obstacle21 road_anomaly fs_static fs_lost_found \
        --data-root data/anomaly --scores msp maxlogit rba --out-dir work_dirs/anomaly_eval

Each name selects ``configs/_base_/datasets/anomaly_<name>.py`` (its dataloader, pipeline and
``AnomalyMetric``); ``--data-root`` replaces the parent folder of the config's ``data_root``.
A custom dataset config can be given as ``name=path/to/config.py``. The model is built and the
checkpoint loaded once; rows of the table are dataset x score, columns AuPRC, FPR95, AUROC (and
sIoU, PPV, mean F1 with ``--component-metrics``). The table is also written as ``anomaly.csv``
and ``anomaly.json`` in ``--out-dir``; ``--show-dir DIR`` saves, per image, the image, the anomaly
heat map and the ground truth side by side under ``DIR/<dataset>/``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import os.path as osp
import sys
from typing import Dict, List

_REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import eomt_mm  # noqa: E402,F401  (registers modules, safe checkpoint loading)
from eomt_mm.anomaly.metric import format_table  # noqa: E402
from eomt_mm.anomaly.scores import check_score_names  # noqa: E402
from eomt_mm.anomaly.visualization import AnomalyVisHook  # noqa: E402

DATASET_CONFIG_DIR = osp.join(_REPO_ROOT, 'configs', '_base_', 'datasets')
PIXEL_COLUMNS = ('AuPRC', 'FPR95', 'AUROC')
COMPONENT_COLUMNS = ('sIoU', 'PPV', 'mean_F1')


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description='Evaluate anomaly segmentation benchmarks')
    parser.add_argument('config', help='model config (an EoMT config)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--datasets', nargs='+', required=True,
                        help='benchmark names (anomaly_<name>.py) or name=config.py')
    parser.add_argument('--data-root', help='folder holding the benchmark folders')
    parser.add_argument('--scores', nargs='+', default=['msp', 'maxlogit', 'rba'],
                        help='anomaly scores to evaluate side by side')
    parser.add_argument('--component-metrics', action='store_true',
                        help='also compute SegmentMeIfYouCan sIoU / PPV / mean F1')
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


def evaluation_parts(path: str, data_root: str | None, scores: List[str], components: bool):
    """Test dataloader and evaluator configs of one benchmark."""
    ds_cfg = Config.fromfile(path)
    loader = ds_cfg.test_dataloader
    if data_root is not None:
        loader.dataset.data_root = osp.join(data_root, osp.basename(
            osp.normpath(loader.dataset.data_root)))
    evaluator = dict(ds_cfg.test_evaluator)
    evaluator.update(score_names=scores, component_metrics=components)
    return loader, evaluator


def main(argv=None) -> Dict[str, Dict[str, float]]:
    """Runs every benchmark and returns ``{dataset: {metric key: value}}``."""
    args = parse_args(argv)
    scores = check_score_names(args.scores)
    datasets = dataset_configs(args.datasets)
    for what, path in (('config', args.config), ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} file {path!r} does not exist')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    # The segmentor computes exactly the scores the metric reads.
    cfg.model.setdefault('test_cfg', {})
    cfg.model.test_cfg['anomaly_scores'] = scores
    cfg.work_dir = args.out_dir
    cfg.load_from = args.checkpoint
    cfg.resume = False
    for key in ('train_dataloader', 'train_cfg', 'optim_wrapper', 'param_scheduler',
                'val_dataloader', 'val_cfg', 'val_evaluator'):
        cfg.pop(key, None)
    first = next(iter(datasets.values()))
    cfg.test_dataloader, cfg.test_evaluator = evaluation_parts(
        first, args.data_root, scores, args.component_metrics)
    cfg.test_cfg = dict(type='TestLoop')
    runner = Runner.from_cfg(cfg)
    vis_hook = None
    if args.show_dir:
        vis_hook = AnomalyVisHook(args.show_dir, score_name=args.show_score,
                                  max_images=args.max_show)
        runner.register_hook(vis_hook)

    results: Dict[str, Dict[str, float]] = {}
    for name, path in datasets.items():
        loader, evaluator = evaluation_parts(path, args.data_root, scores, args.component_metrics)
        # Reuse the built model (and the loaded checkpoint); only the loop is rebuilt.
        runner._test_dataloader = loader
        runner._test_evaluator = evaluator
        runner._test_loop = dict(type='TestLoop')
        if vis_hook is not None:
            vis_hook.out_dir = osp.join(args.show_dir, name)
        results[name] = runner.test()

    columns = list(PIXEL_COLUMNS) + (list(COMPONENT_COLUMNS) if args.component_metrics else [])
    rows = [[name, score] + [metrics.get(f'{score}/{col}', float('nan')) for col in columns]
            for name, metrics in results.items() for score in scores]
    print(format_table(['dataset', 'score'] + columns, rows))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(osp.join(args.out_dir, 'anomaly.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['dataset', 'score'] + columns)
        writer.writerows(rows)
    with open(osp.join(args.out_dir, 'anomaly.json'), 'w') as f:
        json.dump([dict(zip(['dataset', 'score'] + columns, row)) for row in rows], f, indent=1)
    return results


if __name__ == '__main__':
    main()
