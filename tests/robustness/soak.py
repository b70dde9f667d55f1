#!/usr/bin/env python
"""Soak test: train the demo, SIGKILL it at random points, resume, and compare with a clean run.

What it does (all on the CPU, through the same command a user types):

1. renders a demo data set with ``tools/make_demo_data.py`` into the work dir;
2. **reference**: ``tools/train.py configs/eomt_lora_demo.py`` for ``--iters`` iterations with a
   checkpoint every ``--ckpt-interval`` iterations, uninterrupted, seed ``--seed``;
3. **soak**: the same command in a second work dir, killed with SIGKILL (the whole process
   group) ``--kills`` times and restarted with ``--resume`` after each kill until it finishes.
   The kill points come from a seeded plan: the run is cut into ``--kills`` segments and each
   kill is anchored at a random iteration of its segment; a *step* kill fires a random fraction
   of an iteration after that iteration is logged (so it lands inside the next training step),
   a *save* kill (``--save-share`` of them) fires a random delay after mmengine announces
   the next checkpoint, aimed at one of the stages of a save as timed on the reference run
   by watching its work dir: serialising, writing the file, or renaming it and updating
   ``last_checkpoint``;
4. after every kill the soak work dir is scanned: every ``*.pth`` must load with the project's
   weights-only loader and be a complete checkpoint of the iteration its name says,
   ``last_checkpoint`` must name such a file, and the only other leftovers allowed are the
   temporary files of the atomic writer ``eomt_mm.utils.io.atomic_write``
   (``.<name>.<pid>.<uuid>.tmp`` beside the target), which resume never reads (it only follows ``last_checkpoint``);
5. the final checkpoints of both runs are compared: the largest absolute difference over every
   tensor of the ``state_dict`` (parameters and buffers) and of the optimizer state.

The tolerance is 0 (``--atol``): ``tools/train.py`` adds ``RNGStateHook`` and mmengine replays
the data sampler on resume, so a resumed run is meant to be bit-identical to an uninterrupted
one with the same seed on the same machine (``tests/test_demo_tools.py`` asserts ``torch.equal``
for one resume). Any non-zero difference is a real divergence, not rounding: both runs execute
the same kernels on the same inputs in the same order. The script exits with 1 when the weights
differ beyond ``--atol``, a half-written or unloadable checkpoint or an empty or dangling
``last_checkpoint`` was found, a restart failed or the run did not finish within ``--minutes``.

    python tests/robustness/soak.py --iters 60 --ckpt-interval 5 --kills 3 --batch-size 2
    python tests/robustness/soak.py --out work_dirs/soak/soak.json   # 600 iterations, 8 kills

Its checks (``soak_checks.py``), settings and kill plan (``soak_plan.py``) and process control
(``soak_runner.py``) are the modules beside this script; ``test_soak.py`` tests them and runs a
short soak.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import os.path as osp
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Sequence

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))
# The soak's own modules (this folder), eomt_mm (the repository root, also without an install)
# and the table helpers of the benchmark scripts.
for _path in (HERE, REPO, osp.join(REPO, 'tools', 'benchmark')):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_stats import cpu_name, format_table  # noqa: E402
from soak_checks import compare_checkpoints, resume_point  # noqa: E402
from soak_plan import SoakSettings, make_data, plan_kills, train_options  # noqa: E402
from soak_runner import (PHASE_SAVE_BEFORE_WRITE, PHASE_SAVE_MID_WRITE,  # noqa: E402
                         SAVE_PHASES, run_training)


def summarize(settings: SoakSettings, soak: Dict[str, Any],
              comparison: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts of the soak run: iterations trained, checkpoints written, kills by phase.

    ``unsafe_files`` counts distinct findings of :func:`scan_work_dir` (a half-written or
    unreadable ``*.pth``, an empty or dangling ``last_checkpoint``), over all scans.
    """
    attempts = soak['attempts']
    trained = sum(max(0, a['last_iter'] - a['resumed_from']) for a in attempts)
    phases = [k.get('phase') for k in soak['kills']]
    unfinished_saves = sum(p in (PHASE_SAVE_BEFORE_WRITE, PHASE_SAVE_MID_WRITE) for p in phases)
    saves = sum(len(a['saves']) for a in attempts) - unfinished_saves
    return dict(
        # A run killed right after its final save resumes at max_iters and logs nothing.
        final_iter=(max(attempts[-1]['last_iter'], attempts[-1]['resumed_from'])
                    if soak['finished'] else None),
        iterations_trained=trained,
        iterations_redone=trained - settings.iters if soak['finished'] else None,
        checkpoints_written=saves, restarts=len(attempts) - 1,
        kills_survived=len(soak['kills']) if soak['finished'] else 0,
        kills_in_save=sum(p in SAVE_PHASES for p in phases),
        phases={p: phases.count(p) for p in sorted(set(phases))},
        temp_files_left=len(soak['temp_files']),
        # A file stays broken from the kill that broke it to the end: count it once.
        unsafe_files=len({p.split(': ', 1)[1] for p in soak['problems']}),
        max_weight_diff=None if comparison is None else comparison['max_weight_diff'],
        max_optimizer_diff=None if comparison is None else comparison['max_optimizer_diff'])


def report(summary: Dict[str, Any], soak: Dict[str, Any], settings: SoakSettings,
           header: str, wall_s: float) -> str:
    """The soak's tables: one summary row, then one row per kill."""

    def diff(value: Optional[float]) -> str:
        return 'n/a' if value is None else f'{value:.3g}'

    table = format_table(
        ['iterations', 'trained (redone)', 'checkpoints written', 'kills survived',
         'in a save', 'temp files left', 'unsafe files found', 'max abs diff weights',
         'max abs diff optimizer', 'wall time'],
        [[f"{summary['final_iter']}/{settings.iters}" if summary['final_iter'] else
          f'unfinished/{settings.iters}',
          f"{summary['iterations_trained']} ({summary['iterations_redone']})"
          if soak['finished'] else f"{summary['iterations_trained']} (n/a)",
          summary['checkpoints_written'], summary['kills_survived'], summary['kills_in_save'],
          summary['temp_files_left'], summary['unsafe_files'],
          diff(summary['max_weight_diff']), diff(summary['max_optimizer_diff']),
          f'{wall_s / 60:.1f} min']])
    rows = [[i + 1, k['kind'], k['anchor'], f"{k['delay_s'] * 1000:.0f} ms",
             k.get('last_logged_iter', '?'), k.get('phase', '?'),
             resume_point(k.get('resume_point'))] for i, k in enumerate(soak['kills'])]
    kills = format_table(['kill', 'aimed at', 'anchor iter', 'delay', 'last logged iter',
                          'landed in', 'resumed from'], rows) if rows else '(no kills)'
    return f'{header}\n{table}\n\n{kills}'


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--iters', type=int, default=600, help='training iterations (600)')
    parser.add_argument('--ckpt-interval', type=int, default=25,
                        help='checkpoint every N iterations (25)')
    parser.add_argument('--kills', type=int, default=8, help='kills to deliver (8)')
    parser.add_argument('--save-share', type=float, default=0.4,
                        help='fraction of the kills aimed at a checkpoint save (0.4)')
    parser.add_argument('--seed', type=int, default=0,
                        help='training seed and seed of the kill plan (0)')
    parser.add_argument('--batch-size', type=int, default=4, help='training batch (4, the demo)')
    parser.add_argument('--max-keep-ckpts', type=int, default=2,
                        help='checkpoints kept (2, the demo; -1 keeps all)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads per training process (1; 0 = torch default)')
    parser.add_argument('--minutes', type=float, default=30.0,
                        help='time budget of the whole soak, reference run included (30); '
                        'kills stop when the rest of the run would not fit')
    parser.add_argument('--atol', type=float, default=0.0,
                        help='allowed max |weight difference| (0: resume is bit-exact)')
    parser.add_argument('--work-dir', help='folder for data, runs and logs (default: a '
                        'temporary folder, removed at the end unless --keep)')
    parser.add_argument('--keep', action='store_true', help='keep the temporary folder')
    parser.add_argument('--out', help='write the results as JSON here')
    args = parser.parse_args(argv)
    settings = SoakSettings(iters=args.iters, ckpt_interval=args.ckpt_interval,
                            batch_size=args.batch_size, max_keep_ckpts=args.max_keep_ckpts,
                            seed=args.seed, threads=args.threads)
    try:
        settings.validate()
    except ValueError as err:
        parser.error(str(err))
    if args.kills < 0 or args.minutes <= 0 or args.atol < 0:
        parser.error('--kills and --atol must be >= 0 and --minutes > 0')
    if not 0.0 <= args.save_share <= 1.0:
        parser.error(f'--save-share must be in [0, 1], got {args.save_share}')

    start = time.monotonic()
    deadline = start + args.minutes * 60
    temp = args.work_dir is None
    root = tempfile.mkdtemp(prefix='eomt_soak_') if temp else osp.abspath(args.work_dir)
    os.makedirs(root, exist_ok=True)
    ref_dir, soak_dir = osp.join(root, 'reference'), osp.join(root, 'soak')
    for d in (ref_dir, soak_dir):
        if osp.exists(d) and os.listdir(d):
            parser.error(f'{d} is not empty: a soak needs fresh run folders (--resume would '
                         'continue an old run); choose another --work-dir')
        os.makedirs(d, exist_ok=True)
    import torch
    header = (f'Soak (kill -9 + --resume) of configs/eomt_lora_demo.py | {settings.iters} '
              f'iterations, checkpoint every {settings.ckpt_interval}, batch '
              f'{settings.batch_size}, keep {settings.max_keep_ckpts}, seed {settings.seed}, '
              f'{args.kills} kills planned ({round(args.kills * args.save_share)} at saves) | '
              f'CPU: {cpu_name()} | {os.cpu_count()} cores | '
              f'threads/process {settings.threads or "default"} | torch {torch.__version__} | '
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        data = make_data(osp.join(root, 'data'), settings.num_train)
        options = train_options(settings, data)
        say(f'reference run ({settings.iters} iterations, uninterrupted) in {ref_dir}')
        ref = run_training(ref_dir, options, settings, [], deadline, ref_dir, say,
                           watch_saves=True)
        if not ref['finished']:
            say(f"reference run failed: {ref['failure']}")
            return 1
        iter_s = statistics.median(t for a in ref['attempts'] for t in a['iter_times'])
        windows = [w for a in ref['attempts'] for w in a['save_windows']]
        if not windows:
            say('reference run: no checkpoint save was seen on disk')
            return 1
        save_window = tuple(statistics.median(w[i] for w in windows) for i in range(3))
        plan = plan_kills(random.Random(args.seed), settings, args.kills, iter_s, save_window,
                          args.save_share)
        say(f'  {iter_s * 1000:.0f} ms per iteration; a save writes its file from '
            f'{save_window[0] * 1000:.1f} to {save_window[1] * 1000:.1f} ms after it is '
            f'announced and last_checkpoint names it at {save_window[2] * 1000:.1f} ms '
            f'(medians of {len(windows)}); soak run with {args.kills} kills in {soak_dir}')
        soak = run_training(soak_dir, options, settings, plan, deadline, soak_dir, say)
        comparison = (compare_checkpoints(ref['final_checkpoint'], soak['final_checkpoint'])
                      if soak['finished'] else None)
        wall = time.monotonic() - start
        summary = summarize(settings, soak, comparison)
        print(report(summary, soak, settings, header, wall), flush=True)

        failures = [f'reference run: {p}' for p in ref['problems']] + soak['problems']
        if soak['failure']:
            failures.append(soak['failure'])
        if comparison is not None:
            if comparison['iters'] != [settings.iters, settings.iters]:
                failures.append(f"final checkpoints are at iterations {comparison['iters']}, "
                                f'expected {settings.iters}')
            if not comparison['max_weight_diff'] <= args.atol:
                failures.append(f"weights differ from the uninterrupted run by "
                                f"{comparison['max_weight_diff']:.3g} > --atol {args.atol}: "
                                f"{comparison['differing'][:5]}")
        if soak['skipped_kills']:
            say(f"note: {soak['skipped_kills']} planned kill(s) skipped for the time budget")
        if summary['temp_files_left']:
            say(f"note: {summary['temp_files_left']} temporary file(s) of killed atomic writes "
                "were left (.<name>.<pid>.<uuid>.tmp); resume never reads them")
        for f in failures:
            say(f'FAILED: {f}')
        if args.out:
            os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
            with open(args.out, 'w') as f:
                json.dump(dict(header=header, args=vars(args), cpu=cpu_name(),
                               settings=dataclasses.asdict(settings), plan=[
                                   dataclasses.asdict(p) for p in plan],
                               iteration_s=iter_s, save_window_s=save_window,
                               summary=summary,
                               comparison=comparison, reference=ref, soak=soak,
                               failures=failures, wall_s=wall, work_dir=root), f, indent=1)
        return 1 if failures else 0
    finally:
        if temp and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif temp:
            say(f'kept {root}')


if __name__ == '__main__':
    sys.exit(main())
