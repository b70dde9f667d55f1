"""Adapter ensembles: cost against one model, and anomaly metrics of members vs the ensemble.

Two measurements (README "Adapter ensembles")::

    # Cost: EoMT-B/16 inference at 640 (K=4 ensemble vs one model, rotated rounds in one run)
    # and training-step time (K=4 joint vs one member vs 4 separate steps), CPU, 1 thread.
    python tools/benchmark/ensemble.py cost --threads 1

    # Anomaly metrics on the demo's anomaly split: K=4 members trained jointly
    # (configs/eomt_lora_ensemble_demo.py), three repetitions with different seeds.
    python tools/make_demo_data.py --out data/demo
    python tools/benchmark/ensemble.py anomaly --data-root data/demo --iters 600

The models of ``cost`` have random weights (timings do not depend on the values): LoRA r=8 on
the 3 query blocks of EoMT-B/16, with their norms, the final norm and the heads per member.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))
for path in (REPO, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_models import eomt_b_config, random_batch  # noqa: E402
from bench_stats import cpu_name, format_table, median  # noqa: E402

DEMO_CONFIG = osp.join(REPO, 'configs', 'eomt_lora_ensemble_demo.py')
ANOMALY_CONFIG = osp.join(REPO, 'configs', '_base_', 'datasets', 'anomaly_demo_roads.py')
SCORES = ['msp', 'maxlogit', 'rba']
ENSEMBLE_LORA = dict(layers={'last': 3}, trainable_norms=False,
                     trainable_modules=[r'backbone\.layers\.(9|10|11)\.ln[12]', 'backbone.ln1'])


def _build(cfg: dict):
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    import eomt_mm  # noqa: F401
    from mmseg.registry import MODELS
    return MODELS.build(cfg)


def _models(size: int, members: int, **extra):
    cfg = eomt_b_config(size, dict(ENSEMBLE_LORA))
    cfg.update(extra)
    single = _build(dict(cfg))
    ensemble = _build(dict(cfg, type='AdapterEnsembleEoMT',
                           member_seeds=list(range(members))))
    return single, ensemble


def _rounds(funcs: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of each function, in rotated order each round (after one warm-up)."""
    names = list(funcs)
    for name in names:
        funcs[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            funcs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def cost(args: argparse.Namespace) -> dict:
    """Inference and training-step times of the ensemble against one model."""
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    single, ensemble = _models(args.size, args.members)
    single.eval(), ensemble.eval()
    img = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        tokens, grid, _ = single._run_blocks(img, masked_attn=False)

        def decoder_only():
            masks, classes = single._predict(tokens, grid)
            up = F.interpolate(masks, size=img.shape[-2:], mode='bilinear', align_corners=False)
            single.decoder.semantic_map(classes, up)

        infer = _rounds({'one model': lambda: single.inference(img),
                         f'ensemble K={args.members}': lambda: ensemble.inference(img),
                         'decoder of one model': decoder_only}, args.rounds)
    del single, ensemble
    layers = 12
    query_blocks = 3
    t_one = median(infer['one model'])
    t_ens = median(infer[f'ensemble K={args.members}'])
    share = median(infer['decoder of one model']) / t_one
    formula = 1 + (args.members - 1) * (query_blocks / layers + share)
    result = dict(cpu=cpu_name(), threads=args.threads, size=args.size, members=args.members,
                  inference_s=dict(one=t_one, ensemble=t_ens), ratio=t_ens / t_one,
                  decoder_share=share, formula_ratio=formula)

    torch.manual_seed(0)
    single, ensemble = _models(args.train_size, args.members)
    single.train(), ensemble.train()
    imgs, samples = random_batch(args.train_size, 1, seed=0)

    def step(model, opt):
        losses = model.loss(imgs, samples)
        sum(v for k, v in losses.items() if 'loss' in k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    opts = {id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
            for m in (single, ensemble)}
    train = _rounds({'one member': lambda: step(single, opts[id(single)]),
                     f'joint K={args.members}': lambda: step(ensemble, opts[id(ensemble)])},
                    args.rounds)
    t_single = median(train['one member'])
    t_joint = median(train[f'joint K={args.members}'])
    result.update(train_size=args.train_size,
                  train_step_s=dict(one=t_single, joint=t_joint,
                                    separate=args.members * t_single),
                  train_ratio_to_one=t_joint / t_single,
                  train_ratio_to_separate=t_joint / (args.members * t_single))
    rows = [['inference, one model', f'{t_one:.3f}', '1.00'],
            [f'inference, ensemble K={args.members}', f'{t_ens:.3f}', f'{t_ens / t_one:.2f}'],
            [f'formula 1 + (K-1)(L2/L + decoder share {share:.3f})', '', f'{formula:.2f}'],
            [f'train step {args.train_size}px, one member', f'{t_single:.3f}', '1.00'],
            [f'train step, joint K={args.members}', f'{t_joint:.3f}', f'{t_joint / t_single:.2f}'],
            [f'train step, {args.members} separate steps', f'{args.members * t_single:.3f}',
             f'{args.members:.2f}']]
    print(f'{cpu_name()}, {args.threads} thread(s), median of {args.rounds} rotated rounds')
    print(format_table(['what', 'seconds', 'ratio to one'], rows))
    return result


def _train_members(args: argparse.Namespace, rep: int, work_dir: str) -> str:
    """Train K members jointly with tools/train.py; returns the final checkpoint."""
    iters = args.iters
    seeds = [rep * 100 + k for k in range(args.members)]
    roots = ' '.join(f'{loader}.dataset.data_root={args.data_root}'
                     for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'))
    options = (f'{roots} train_cfg.max_iters={iters} train_cfg.val_interval={iters} '
               f'default_hooks.checkpoint.interval={iters} param_scheduler.0.end={iters} '
               f'param_scheduler.0.warmup_iters=({max(1, iters // 12)},{max(2, iters // 6)}) '
               f'randomness.seed={rep} model.member_seeds={seeds}')
    cmd = [sys.executable, osp.join(REPO, 'tools', 'train.py'), DEMO_CONFIG, '--work-dir',
           work_dir, '--cfg-options'] + options.replace(', ', ',').split(' ')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with open(osp.join(work_dir + '.log'), 'w') as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return osp.join(work_dir, f'iter_{iters}.pth')


def _evaluate(args: argparse.Namespace, checkpoint: str) -> Dict[str, Dict[str, float]]:
    """Pooled exact pixel metrics of every member score and ensemble score on the split."""
    from mmengine.config import Config
    from mmengine.runner import Runner, load_checkpoint
    import eomt_mm.engine.safe_checkpoint_install  # noqa: F401
    from eomt_mm.anomaly.pixel_metrics import pixel_metrics_from_arrays
    cfg = Config.fromfile(DEMO_CONFIG)
    model_cfg = cfg.model.to_dict()
    model_cfg['test_cfg'] = dict(mode='whole', member_scores=SCORES,
                                 anomaly_scores=SCORES + ['mutual_info', 'rba_variance'])
    model = _build(model_cfg).eval()
    load_checkpoint(model, checkpoint, map_location='cpu')
    data_cfg = Config.fromfile(ANOMALY_CONFIG)
    loader_cfg = data_cfg.test_dataloader.to_dict()
    loader_cfg['dataset']['data_root'] = osp.join(args.data_root, 'anomaly')
    loader = Runner.build_dataloader(loader_cfg)
    scores: Dict[str, List[np.ndarray]] = {}
    labels = []
    with torch.no_grad():
        for batch in loader:
            for sample in model.test_step(batch):
                labels.append(sample.gt_sem_seg.data.numpy().reshape(-1))
                for name, value in sample.anomaly_scores.items():
                    scores.setdefault(name, []).append(value.numpy().reshape(-1))
    labels = np.concatenate(labels)
    out = {}
    for name, parts in scores.items():
        metrics = pixel_metrics_from_arrays(np.concatenate(parts).astype(np.float32), labels)
        out[name] = dict(AuPRC=100 * metrics.auprc, FPR95=100 * metrics.fpr_at_tpr,
                         AUROC=100 * metrics.auroc)
    return out


def anomaly(args: argparse.Namespace) -> dict:
    """Members alone, the mean-score ensemble and the disagreement scores, per repetition."""
    os.makedirs(args.work_dir, exist_ok=True)
    reps = []
    for rep in range(args.repetitions):
        work_dir = osp.join(args.work_dir, f'rep{rep}')
        checkpoint = osp.join(work_dir, f'iter_{args.iters}.pth')
        if not osp.isfile(checkpoint):
            checkpoint = _train_members(args, rep, work_dir)
        reps.append(_evaluate(args, checkpoint))
        print(f'repetition {rep}: done ({checkpoint})', flush=True)
    rows = []
    names = [f'{s}_m{k}' for s in SCORES for k in range(args.members)]
    names += SCORES + ['mutual_info', 'rba_variance']
    for name in names:
        row = [name]
        for metric in ('AuPRC', 'FPR95', 'AUROC'):
            values = [r[name][metric] for r in reps]
            row.append(f'{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]')
        rows.append(row)
    print(f'{args.repetitions} repetitions, {args.iters} iterations, K={args.members}: '
          'median [min, max]')
    print(format_table(['score', 'AuPRC', 'FPR95', 'AUROC'], rows))
    return dict(iters=args.iters, members=args.members, repetitions=reps)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='what', required=True)
    p_cost = sub.add_parser('cost', help='inference and training-step time')
    p_cost.add_argument('--size', type=int, default=640)
    p_cost.add_argument('--train-size', type=int, default=256)
    p_cost.add_argument('--rounds', type=int, default=5)
    p_anom = sub.add_parser('anomaly', help='metrics on the demo anomaly split')
    p_anom.add_argument('--data-root', default=osp.join(REPO, 'data', 'demo'))
    p_anom.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs', 'ensemble_bench'))
    p_anom.add_argument('--iters', type=int, default=600)
    p_anom.add_argument('--repetitions', type=int, default=3)
    for p in (p_cost, p_anom):
        p.add_argument('--members', type=int, default=4)
        p.add_argument('--threads', type=int, default=1)
        p.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    if args.what == 'anomaly' and not osp.isdir(osp.join(args.data_root, 'anomaly')):
        raise FileNotFoundError(f'{args.data_root}/anomaly is missing; render the demo data '
                                f'with `python tools/make_demo_data.py --out {args.data_root}`')
    result = cost(args) if args.what == 'cost' else anomaly(args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
