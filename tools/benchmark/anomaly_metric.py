"""Speed and peak memory of the pooled anomaly metrics: eomt_mm vs scikit-learn.

Usage::

    python tools/benchmark/anomaly_metric.py --pixels 50000000 [--pos-rate 0.05] [--levels 0]

Generates ``--pixels`` float32 scores with bool labels (saved once to a temporary folder), then
runs each method in its own fresh subprocess so their peak memories cannot mix:

* ``ours``: ``split_by_label`` + ``pooled_pixel_metrics`` (AuPRC, FPR95, AUROC from one sort);
* ``sklearn``: ``average_precision_score`` + ``roc_curve(drop_intermediate=False)`` (FPR95 at the
  first TPR >= 0.95) + ``roc_auc_score``.

Each worker loads the data, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``; falls
back to ``ru_maxrss`` minus the RSS after loading), times the metric computation, and reports the
peak RSS above the loaded data. The script checks that both give the same numbers (1e-9) and
prints the time and memory ratios with the CPU name.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_stats import cpu_name  # noqa: E402


def _rss_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _reset_peak() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _worker(method: str, data_dir: str) -> dict:
    scores = np.load(os.path.join(data_dir, 'scores.npy'))
    labels = np.load(os.path.join(data_dir, 'labels.npy'))
    if method == 'ours':
        from eomt_mm.anomaly.pixel_metrics import pooled_pixel_metrics, split_by_label
    else:
        from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    base = _rss_kib('VmRSS')
    exact_peak = _reset_peak()
    start = time.perf_counter()
    if method == 'ours':
        pos, neg = split_by_label(scores, labels)
        out = pooled_pixel_metrics(pos, neg, in_place=True)
        result = dict(auprc=out.auprc, fpr95=out.fpr_at_tpr, auroc=out.auroc)
    else:
        auprc = average_precision_score(labels, scores)
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        fpr95 = float(fpr[np.argmax(tpr >= 0.95)])
        del fpr, tpr
        result = dict(auprc=float(auprc), fpr95=fpr95, auroc=float(roc_auc_score(labels, scores)))
    seconds = time.perf_counter() - start
    if exact_peak:
        peak = _rss_kib('VmHWM')
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result.update(seconds=seconds, peak_delta_mib=(peak - base) / 1024,
                  input_mib=(scores.nbytes + labels.nbytes) / 2**20, exact_peak=exact_peak)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pixels', type=int, default=50_000_000)
    parser.add_argument('--pos-rate', type=float, default=0.05,
                        help='fraction of anomaly pixels')
    parser.add_argument('--levels', type=int, default=0,
                        help='quantise scores to about this many levels per unit (0 = no ties)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--worker', choices=['ours', 'sklearn'], help=argparse.SUPPRESS)
    parser.add_argument('--data', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(_worker(args.worker, args.data)))
        return

    with tempfile.TemporaryDirectory(prefix='anomaly_bench_') as tmp:
        rng = np.random.default_rng(args.seed)
        labels = rng.random(args.pixels, dtype=np.float32) < args.pos_rate
        scores = rng.standard_normal(args.pixels, dtype=np.float32)
        scores += labels * np.float32(1.5)
        if args.levels:
            scores = np.round(scores * args.levels) / np.float32(args.levels)
        np.save(os.path.join(tmp, 'scores.npy'), scores)
        np.save(os.path.join(tmp, 'labels.npy'), labels)
        distinct = np.unique(scores).size
        del scores, labels

        results = {}
        for method in ('ours', 'sklearn'):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', method,
                                   '--data', tmp], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f'{method} worker failed:\n{proc.stderr}')
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    ours, ref = results['ours'], results['sklearn']
    print(f'CPU: {cpu_name()} ({os.cpu_count()} logical cores), numpy {np.__version__}, '
          f'python {platform.python_version()}')
    print(f'pixels: {args.pixels:,} ({args.pos_rate:.0%} anomaly, {distinct:,} distinct float32 '
          f'scores), input {ours["input_mib"]:.0f} MiB')
    print(f'{"method":<8} {"seconds":>8} {"peak RSS above input (MiB)":>27}  AuPRC     FPR95     '
          'AUROC')
    for name, r in (('ours', ours), ('sklearn', ref)):
        print(f'{name:<8} {r["seconds"]:8.2f} {r["peak_delta_mib"]:27.0f}  {r["auprc"]:.6f}  '
              f'{r["fpr95"]:.6f}  {r["auroc"]:.6f}')
    diffs = {k: abs(ours[k] - ref[k]) for k in ('auprc', 'fpr95', 'auroc')}
    equal = all(d <= 1e-9 for d in diffs.values())
    print('max |ours - sklearn|: ' + ', '.join(f'{k} {d:.1e}' for k, d in diffs.items())
          + (' (equal within 1e-9)' if equal else ' (NOT EQUAL)'))
    speedup = ref['seconds'] / ours['seconds']
    mem_ratio = ours['peak_delta_mib'] / ref['peak_delta_mib']
    print(f'speed-up: {speedup:.1f}x (target >= 5x); peak memory: {mem_ratio:.2f} of '
          f'scikit-learn\'s (target <= 0.33)')
    if not equal:
        sys.exit(1)


if __name__ == '__main__':
    main()
