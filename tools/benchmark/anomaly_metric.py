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

End-to-end mode (``--end-to-end``)::

    python tools/benchmark/anomaly_metric.py --end-to-end --frames 300 [--height 1024 --width 2048]

generates ``--frames`` synthetic frames (default 300 of 2048x1024: 6.3e8 pixels) with realistic
score maps (smooth fields, tanh-saturated regions whose scores tie exactly, anomaly blobs on a
road region, void sky / ego-vehicle bands, frames without an anomaly) one at a time and feeds them
to ``AnomalyMetric(protocol=('exact', 'smiyc'), component_metrics=True)`` as the test loop would.
It reports the peak RSS of that process, the time of ``process`` and of ``evaluate``, and the bytes
spilled to disk; then scikit-learn (own process) on the first frames whose pooled pixels fit in
``--sklearn-max-pixels``, and ``AnomalyMetric(protocol='exact')`` on those same frames (own
process) so the two can be compared (time, equality within 1e-9).
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


def synthetic_frame(rng: np.random.Generator, height: int, width: int):
    """One realistic frame: ``(score float32 [H, W], label uint8 [H, W])``.

    The score is ``tanh`` of a smooth field (bicubic upsampling of a coarse Gaussian grid plus
    fine noise), scaled so that large inlier regions saturate to exactly -1.0 in float32 (the
    ties a saturating score such as RbA's produces); anomalies are 0-3 ellipses on the road
    region with a raised field; the top 30 % (sky) and a bottom band (ego vehicle) are void;
    about one frame in five has no anomaly.
    """
    import cv2
    coarse = rng.standard_normal((height // 64 + 2, width // 64 + 2)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    field += 0.15 * rng.standard_normal((height, width), dtype=np.float32)
    label = np.zeros((height, width), np.uint8)
    label[:int(0.3 * height)] = 255
    label[int(0.92 * height):] = 255
    yy, xx = np.ogrid[:height, :width]
    for _ in range(int(rng.integers(0, 4)) if rng.random() > 0.2 else 0):
        cy = rng.integers(int(0.4 * height), int(0.9 * height))
        cx = rng.integers(0, width)
        ry, rx = rng.integers(8, height // 8), rng.integers(8, width // 10)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        label[blob & (label != 255)] = 1
        field[blob] += np.float32(2.5)
    score = np.tanh(np.float32(3.0) * (field - np.float32(1.0))).astype(np.float32)
    return score, label


def _e2e_frames(seed: int, frames: int, height: int, width: int):
    rng = np.random.default_rng(seed)
    for _ in range(frames):
        yield synthetic_frame(rng, height, width)


def _e2e_worker(method: str, args: argparse.Namespace) -> dict:
    """``ours`` (both protocols + components), ``ours_exact`` or ``sklearn`` on generated frames."""
    import torch
    if method == 'sklearn':
        from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    else:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))))
        from eomt_mm.anomaly.metric import AnomalyMetric
    frames = args.frames if method == 'ours' else args.sklearn_frames
    base = _rss_kib('VmRSS')
    exact_peak = _reset_peak()
    generate = process = evaluate = 0.0
    result: dict = {}
    if method == 'sklearn':
        scores, labels = [], []
        start = time.perf_counter()
        for score, label in _e2e_frames(args.seed, frames, args.height, args.width):
            keep = label != 255
            scores.append(score[keep])
            labels.append(label[keep] == 1)
        generate = time.perf_counter() - start
        scores, labels = np.concatenate(scores), np.concatenate(labels)
        start = time.perf_counter()
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        result = {'exact/AuPRC': 100 * float(average_precision_score(labels, scores)),
                  'exact/FPR95': 100 * float(fpr[np.argmax(tpr >= 0.95)]),
                  'exact/AUROC': 100 * float(roc_auc_score(labels, scores))}
        evaluate = time.perf_counter() - start
        pixels = int(labels.size)
    else:
        protocols = ('exact', 'smiyc') if method == 'ours' else ('exact', )
        metric = AnomalyMetric(score_names=['rba'], protocol=protocols,
                               component_metrics=method == 'ours', track='anomaly',
                               spill_dir=args.spill_dir)
        pixels = 0
        spilled = 0
        for score, label in _e2e_frames(args.seed, frames, args.height, args.width):
            start = time.perf_counter()
            sample = {'gt_sem_seg': {'data': torch.from_numpy(label)[None]},
                      'anomaly_scores': {'rba': torch.from_numpy(score)[None]}}
            pixels += int((label != 255).sum())
            mid = time.perf_counter()
            metric.process({}, [sample])
            process += time.perf_counter() - mid
            generate += mid - start
        spilled = metric.spilled_bytes
        start = time.perf_counter()
        out = metric.evaluate(frames)
        evaluate = time.perf_counter() - start
        result = {('exact/' + k if not k.startswith('smiyc/') else k): v for k, v in out.items()}
        result['spilled_gib'] = spilled / 2**30
    peak = _rss_kib('VmHWM') if exact_peak else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    result.update(frames=frames, pixels=pixels, generate_s=generate, process_s=process,
                  evaluate_s=evaluate, peak_rss_gib=peak / 2**20,
                  peak_above_start_gib=(peak - base) / 2**20, exact_peak=exact_peak)
    return result


def _run_worker(mode: str, method: str, extra: list) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', method,
                           '--worker-mode', mode] + extra, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        sys.exit(f'{method} worker failed:\n{proc.stderr[-4000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def end_to_end(args: argparse.Namespace) -> None:
    """The ``--end-to-end`` benchmark (see the module docstring)."""
    if args.frames < 1 or args.height < 8 or args.width < 8:
        sys.exit('--frames must be >= 1 and --height / --width >= 8')
    pixels_per_frame = args.height * args.width
    args.sklearn_frames = max(1, min(args.frames, args.sklearn_max_pixels // pixels_per_frame))
    extra = ['--frames', str(args.frames), '--height', str(args.height), '--width',
             str(args.width), '--seed', str(args.seed), '--sklearn-frames',
             str(args.sklearn_frames)] + (['--spill-dir', args.spill_dir] if args.spill_dir
                                          else [])
    ours = _run_worker('e2e', 'ours', extra)
    ref = _run_worker('e2e', 'sklearn', extra)
    subset = _run_worker('e2e', 'ours_exact', extra)
    print(f'CPU: {cpu_name()} ({os.cpu_count()} logical cores), numpy {np.__version__}, '
          f'python {platform.python_version()}')
    print(f'{args.frames} frames of {args.width}x{args.height} ({args.frames * pixels_per_frame:,}'
          f' pixels, {ours["pixels"]:,} labelled), one score; spilled {ours["spilled_gib"]:.2f} '
          'GiB to disk')
    print('run | frames | labelled pixels | process s | evaluate s | peak RSS GiB | '
          'peak above start GiB')
    for name, r in (('AnomalyMetric exact+smiyc+components', ours),
                    ('AnomalyMetric exact (sklearn subset)', subset),
                    ('scikit-learn (pooled arrays)', ref)):
        print(f'{name} | {r["frames"]} | {r["pixels"]:,} | {r["process_s"]:.1f} | '
              f'{r["evaluate_s"]:.1f} | {r["peak_rss_gib"]:.2f} | '
              f'{r["peak_above_start_gib"]:.2f}')
    keys = ('exact/AuPRC', 'exact/FPR95', 'exact/AUROC')
    shown = [f'{p}/rba/{k}' for p in ('exact', 'smiyc') for k in ('AuPRC', 'FPR95', 'mean_F1')]
    print('all frames: ' + ', '.join(f'{k} {ours[k]:.4f}' for k in shown))
    diffs = {k: abs(subset['exact/rba/' + k.split('/')[1]] - ref[k]) / 100 for k in keys}
    equal = all(d <= 1e-9 for d in diffs.values())
    print(f'first {args.sklearn_frames} frames, max |ours - sklearn|: '
          + ', '.join(f'{k} {d:.1e}' for k, d in diffs.items())
          + (' (equal within 1e-9)' if equal else ' (NOT EQUAL)'))
    if not equal:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pixels', type=int, default=50_000_000)
    parser.add_argument('--pos-rate', type=float, default=0.05,
                        help='fraction of anomaly pixels')
    parser.add_argument('--levels', type=int, default=0,
                        help='quantise scores to about this many levels per unit (0 = no ties)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--end-to-end', action='store_true',
                        help='AnomalyMetric end to end on synthetic full-size frames')
    parser.add_argument('--frames', type=int, default=300, help='--end-to-end: frames')
    parser.add_argument('--height', type=int, default=1024, help='--end-to-end: frame height')
    parser.add_argument('--width', type=int, default=2048, help='--end-to-end: frame width')
    parser.add_argument('--sklearn-max-pixels', type=int, default=60_000_000,
                        help='--end-to-end: pixels of the frames given to scikit-learn')
    parser.add_argument('--spill-dir', help='--end-to-end: AnomalyMetric spill_dir')
    parser.add_argument('--worker', choices=['ours', 'sklearn', 'ours_exact'],
                        help=argparse.SUPPRESS)
    parser.add_argument('--worker-mode', default='pooled', help=argparse.SUPPRESS)
    parser.add_argument('--sklearn-frames', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--data', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker_mode == 'e2e':
            print(json.dumps(_e2e_worker(args.worker, args)))
        else:
            print(json.dumps(_worker(args.worker, args.data)))
        return
    if args.end_to_end:
        end_to_end(args)
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
