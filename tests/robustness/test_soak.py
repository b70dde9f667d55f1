"""The kill / resume soak (tests/robustness/soak.py): its checks can fail, and a short soak passes.

The end-to-end test trains the demo config for 8 iterations through ``tools/train.py`` twice:
uninterrupted, and SIGKILLed twice (once inside a training step, once when a checkpoint save
is announced) with ``--resume`` after each kill; the final weights must be bit-identical.
"""
import os
import random
import shutil
import signal
import time

import pytest
import torch

# pytest puts this folder on sys.path (rootdir conftest, no __init__.py): the soak's modules
# import by name, as they do when soak.py runs as a script.
import soak
import soak_checks
import soak_plan
import soak_runner
from soak_runner import classify_kill
from eomt_mm.utils import io as project_io


def _fake_training_checkpoint(it: int, scale: float = 1.0) -> dict:
    torch.manual_seed(0)
    weight = torch.randn(64, 32) * scale
    return dict(state_dict={'head.weight': weight, 'head.bias': torch.zeros(64)},
                optimizer=dict(state={0: dict(step=torch.tensor(float(it)),
                                              exp_avg=weight * 0.1)},
                               param_groups=[dict(lr=1e-3, params=[0])]),
                meta=dict(iter=it, seed=0))


def _write_run(work_dir, iters=(3, 6)):
    """A work dir as CheckpointHook leaves it: iter_N.pth files and last_checkpoint."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for it in iters:
        torch.save(_fake_training_checkpoint(it), work_dir / f'iter_{it}.pth')
    (work_dir / 'last_checkpoint').write_text(str(work_dir / f'iter_{iters[-1]}.pth'))


def test_scanner_accepts_a_complete_run_and_flags_a_truncated_checkpoint(tmp_path):
    _write_run(tmp_path)
    clean = soak_checks.scan_work_dir(str(tmp_path))
    assert clean.ok, clean.problems
    assert clean.checkpoints == {'iter_3.pth': 3, 'iter_6.pth': 6}
    assert clean.last_checkpoint == str(tmp_path / 'iter_6.pth')

    # What a kill during a non-atomic write leaves: the first part of a valid file.
    data = (tmp_path / 'iter_6.pth').read_bytes()
    (tmp_path / 'iter_6.pth').write_bytes(data[:len(data) // 2])
    report = soak_checks.scan_work_dir(str(tmp_path))
    assert not report.ok
    assert set(report.broken) == {'iter_6.pth'}
    assert 'iter_3.pth' in report.checkpoints
    # Both the file itself and the pointer to it are reported.
    assert any('half-written or unreadable checkpoint iter_6.pth' in p for p in report.problems)
    assert any('last_checkpoint names a broken file' in p for p in report.problems)


def test_scanner_flags_bad_pointers_and_mislabelled_checkpoints(tmp_path):
    _write_run(tmp_path)
    (tmp_path / 'last_checkpoint').write_text('')
    assert any('empty' in p for p in soak_checks.scan_work_dir(str(tmp_path)).problems)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_9.pth'))
    assert any('missing file' in p for p in soak_checks.scan_work_dir(str(tmp_path)).problems)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_6.pth'))
    # A complete file whose name claims another iteration is not the checkpoint it says.
    shutil.copy(tmp_path / 'iter_3.pth', tmp_path / 'iter_4.pth')
    report = soak_checks.scan_work_dir(str(tmp_path))
    assert report.broken == {'iter_4.pth': 'meta iter 3 does not match the file name'}
    # A file that loads but is not a training checkpoint (no optimizer / meta).
    torch.save({'state_dict': {}}, tmp_path / 'iter_4.pth')
    assert 'not a complete training checkpoint' in soak_checks.scan_work_dir(
        str(tmp_path)).broken['iter_4.pth']


def test_scanner_recognises_the_atomic_writers_temp_files(tmp_path, monkeypatch):
    """The temp-name pattern is the one the project's atomic writer really writes.

    ``eomt_mm.utils.io.atomic_write_bytes`` is the one atomic writer: mmengine's checkpoint
    saves go through it once safe checkpointing is installed.
    """
    _write_run(tmp_path)
    # Stop the atomic writer right before its rename, as a SIGKILL there would.
    left = []
    monkeypatch.setattr(project_io.os, 'replace', lambda src, dst: left.append(src))
    project_io.atomic_write_bytes(str(tmp_path / 'iter_9.pth'), b'partial bytes')
    monkeypatch.undo()
    assert len(left) == 1 and os.path.isfile(left[0])
    report = soak_checks.scan_work_dir(str(tmp_path))
    assert report.temp_files == [os.path.basename(left[0])]
    # The leftover is neither a *.pth nor named by last_checkpoint, so it is harmless.
    assert report.ok, report.problems
    assert not (tmp_path / 'iter_9.pth').exists()
    # ...and the kill classifier attributes it to the killed process's save.
    pid = int(soak_checks.TEMP_RE.match(report.temp_files[0]).group('pid'))
    assert pid == os.getpid()
    phase = classify_kill(('save', 0.0, 9, None), report, pid, str(tmp_path))
    assert phase == soak_runner.PHASE_SAVE_MID_WRITE
    assert classify_kill(('save', 0.0, 9, None), report, pid + 1,
                          str(tmp_path)) == soak_runner.PHASE_SAVE_BEFORE_WRITE
    # A pointer to a temp file would make resume read a partial write: flagged.
    (tmp_path / 'last_checkpoint').write_text(left[0])
    assert any('temporary file' in p for p in soak_checks.scan_work_dir(str(tmp_path)).problems)


def test_kill_phase_follows_the_last_log_line_and_the_files_on_disk(tmp_path):
    _write_run(tmp_path, iters=(3,))
    scan = soak_checks.scan_work_dir(str(tmp_path))
    assert classify_kill(None, scan, 1, str(tmp_path)) == soak_runner.PHASE_STARTUP
    assert classify_kill(('resumed', 0.0, 3), scan, 1, str(tmp_path)) == soak_runner.PHASE_STARTUP
    assert classify_kill(('iter', 0.0, 4), scan, 1, str(tmp_path)) == soak_runner.PHASE_STEP
    # Killed while mmengine rewrote last_checkpoint (truncated, not yet written).
    pointer_text = (tmp_path / 'last_checkpoint').read_text()
    (tmp_path / 'last_checkpoint').write_text('')
    scan_empty = soak_checks.scan_work_dir(str(tmp_path))
    assert classify_kill(('save', 0.0, 3, None), scan_empty, 1,
                          str(tmp_path)) == soak_runner.PHASE_SAVE_POINTER_EMPTY
    assert soak_checks.resume_point(scan_empty.last_checkpoint) == '(empty last_checkpoint)'
    assert soak_checks.resume_point(None) == 'scratch'
    (tmp_path / 'last_checkpoint').write_text(pointer_text)
    # Save of 6 announced; nothing renamed into place yet.
    announced = ('save', 0.0, 6, None)
    assert classify_kill(announced, scan, 1, str(tmp_path)) == soak_runner.PHASE_SAVE_BEFORE_WRITE
    # iter_6.pth in place, last_checkpoint still at 3, then updated.
    _write_run(tmp_path, iters=(6,))
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_3.pth'))
    scan = soak_checks.scan_work_dir(str(tmp_path))
    assert classify_kill(announced, scan, 1, str(tmp_path)) == soak_runner.PHASE_SAVE_BEFORE_POINTER
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_6.pth'))
    scan = soak_checks.scan_work_dir(str(tmp_path))
    assert classify_kill(announced, scan, 1, str(tmp_path)) == soak_runner.PHASE_AFTER_SAVE
    # A save that would replace an existing iter_6.pth but never reached the rename.
    st = os.stat(tmp_path / 'iter_6.pth')
    same = ('save', 0.0, 6, (st.st_ino, st.st_mtime_ns))
    assert classify_kill(same, scan, 1, str(tmp_path)) == soak_runner.PHASE_SAVE_BEFORE_WRITE


def test_compare_checkpoints_reports_the_largest_difference(tmp_path):
    torch.save(_fake_training_checkpoint(6), tmp_path / 'a.pth')
    torch.save(_fake_training_checkpoint(6), tmp_path / 'b.pth')
    same = soak_checks.compare_checkpoints(str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth'))
    assert same['max_weight_diff'] == 0.0 and same['max_optimizer_diff'] == 0.0
    assert same['tensors'] == 2 and same['iters'] == [6, 6] and same['differing'] == []

    other = _fake_training_checkpoint(6)
    other['state_dict']['head.weight'][3, 5] += 2.5e-7
    other['optimizer']['state'][0]['exp_avg'][0, 0] -= 0.125
    torch.save(other, tmp_path / 'c.pth')
    diff = soak_checks.compare_checkpoints(str(tmp_path / 'a.pth'), str(tmp_path / 'c.pth'))
    assert diff['max_weight_diff'] == pytest.approx(2.5e-7, rel=0.05)
    assert diff['max_optimizer_diff'] == pytest.approx(0.125, rel=1e-6)
    assert 'state_dict.head.weight' in diff['differing']
    # A missing tensor is an infinite difference, not a silent pass.
    del other['state_dict']['head.bias']
    torch.save(other, tmp_path / 'd.pth')
    assert soak_checks.compare_checkpoints(str(tmp_path / 'a.pth'),
                                    str(tmp_path / 'd.pth'))['max_weight_diff'] == float('inf')


def test_kill_plan_is_reproducible_and_moves_forward():
    settings = soak_plan.SoakSettings(iters=600, ckpt_interval=25)
    window = (0.12, 0.13, 0.135)  # write starts, write ends, last_checkpoint updated
    stages = [0, 0, 0]  # save kills per stage of a save, over all seeds
    for seed in range(20):
        plan = soak_plan.plan_kills(random.Random(seed), settings, 8, iter_s=0.4,
                                    save_window=window)
        assert plan == soak_plan.plan_kills(random.Random(seed), settings, 8, 0.4, window)
        assert [k.kind for k in plan].count('save') == 3  # round(8 * 0.4)
        anchors = [k.anchor for k in plan]
        assert anchors == sorted(anchors) and 1 <= anchors[0] and anchors[-1] <= 600
        # One kill per eighth of the run (a save anchor moves up to the next checkpoint).
        assert all(i * 599 // 8 < a <= (i + 1) * 599 // 8 + 25 for i, a in enumerate(anchors))
        for k in plan:
            if k.kind == 'save':
                assert k.anchor % 25 == 0 and 0 <= k.delay_s <= 0.135
                stages[(k.delay_s > 0.12) + (k.delay_s > 0.13)] += 1
            else:
                assert k.kind == 'step' and k.anchor < 600 and 0.02 <= k.delay_s <= 0.38
    # Each plan's 3 save kills cover serialising, writing and the pointer update once each.
    assert stages == [20, 20, 20]
    assert soak_plan.plan_kills(random.Random(0), settings, 0, 0.4, window) == []
    assert {k.kind for k in soak_plan.plan_kills(random.Random(0), settings, 5, 0.4, window,
                                            save_share=1.0)} == {'save'}
    with pytest.raises(ValueError, match='save_share'):
        soak_plan.plan_kills(random.Random(0), settings, 5, 0.4, window, save_share=1.5)
    with pytest.raises(ValueError, match='save_window'):
        soak_plan.plan_kills(random.Random(0), settings, 5, 0.4, (0.2, 0.1, 0.3))
    assert soak_plan.checkpoint_steps(8, 3) == [3, 6, 8]
    assert soak_plan.checkpoint_steps(600, 25)[-2:] == [575, 600]
    with pytest.raises(ValueError, match='iters must be >= 6'):
        soak_plan.SoakSettings(iters=5).validate()
    with pytest.raises(ValueError, match='ckpt_interval'):
        soak_plan.SoakSettings(iters=10, ckpt_interval=11).validate()


def test_summary_counts_a_kill_after_the_final_save():
    # Killed during the save at 6 (nothing written), then right after the final save at 8:
    # the last process resumes at 8, trains nothing and exits.
    attempts = [dict(last_iter=7, resumed_from=0, saves=[3, 6]),
                dict(last_iter=8, resumed_from=3, saves=[6, 8]),
                dict(last_iter=0, resumed_from=8, saves=[])]
    run = dict(attempts=attempts, finished=True, temp_files=['.iter_6.pth.1.' + 'a' * 32 + '.tmp'],
               problems=[], kills=[
                   dict(kind='save', anchor=6, delay_s=0.1, phase=soak_runner.PHASE_SAVE_MID_WRITE),
                   dict(kind='save', anchor=8, delay_s=0.2, phase=soak_runner.PHASE_AFTER_SAVE)])
    settings = soak_plan.SoakSettings(iters=8, ckpt_interval=3)
    summary = soak.summarize(settings, run, dict(max_weight_diff=0.0, max_optimizer_diff=0.0))
    assert summary['final_iter'] == 8
    assert summary['iterations_trained'] == 12 and summary['iterations_redone'] == 4
    assert summary['checkpoints_written'] == 3  # 3, 6 (again) and 8; the killed 6 not
    assert summary['kills_survived'] == 2 and summary['kills_in_save'] == 1
    assert summary['restarts'] == 2 and summary['temp_files_left'] == 1
    run['finished'] = False
    unfinished = soak.summarize(settings, run, None)
    assert unfinished['final_iter'] is None and unfinished['kills_survived'] == 0
    assert '| unfinished/8 ' in soak.report(unfinished, run, settings, 'header', 60.0)


@pytest.mark.slow
def test_short_soak_with_two_kills_matches_the_uninterrupted_run(tmp_path):
    settings = soak_plan.SoakSettings(iters=8, ckpt_interval=3, batch_size=2, max_keep_ckpts=2,
                                 seed=0, threads=1, num_train=8)
    options = soak_plan.train_options(settings, soak_plan.make_data(str(tmp_path / 'data'), 8))
    deadline = time.monotonic() + 600
    ref_dir, soak_dir = tmp_path / 'reference', tmp_path / 'soak'
    ref_dir.mkdir()
    soak_dir.mkdir()
    ref = soak_runner.run_training(str(ref_dir), options, settings, [], deadline, str(ref_dir),
                            say=lambda msg: None, watch_saves=True)
    assert ref['finished'] and not ref['problems'] and not ref['kills']
    assert ref['final_checkpoint'] == str(ref_dir / 'iter_8.pth')
    # Saves at 3, 6 and 8, each timed on disk: the write starts after the announcement and
    # ends (rename) no earlier than it starts.
    assert ref['attempts'][0]['saves'] == [3, 6, 8]
    windows = ref['attempts'][0]['save_windows']
    assert len(windows) == 3
    assert all(0 < start <= end <= pointer < 30 for start, end, pointer in windows), windows

    # Kill 1 inside the step after iteration 4 (the iteration-3 checkpoint is complete);
    # kill 2 the moment the iteration-6 save is announced.
    plan = [soak_plan.PlannedKill('step', 4, 0.0), soak_plan.PlannedKill('save', 6, 0.0)]
    run = soak_runner.run_training(str(soak_dir), options, settings, plan, deadline, str(soak_dir),
                            say=lambda msg: None)
    assert run['finished'], run['failure']
    assert run['problems'] == []
    assert [k['kind'] for k in run['kills']] == ['step', 'save']
    assert [a['exit_code'] for a in run['attempts']] == [-signal.SIGKILL, -signal.SIGKILL, 0]
    # Every restart resumed from a checkpoint, never from scratch, and the last one ended.
    assert run['attempts'][1]['resumed_from'] in (3, 6)
    assert run['attempts'][2]['resumed_from'] in (3, 6)
    assert run['attempts'][2]['resumed_from'] >= run['attempts'][1]['resumed_from']
    assert run['attempts'][2]['last_iter'] == 8
    assert run['kills'][0]['phase'] == soak_runner.PHASE_STEP
    assert run['kills'][1]['phase'] in (soak_runner.SAVE_PHASES + (soak_runner.PHASE_AFTER_SAVE,))

    cmp = soak_checks.compare_checkpoints(ref['final_checkpoint'], run['final_checkpoint'])
    assert cmp['iters'] == [8, 8]
    assert cmp['max_weight_diff'] == 0.0, cmp['differing']
    assert cmp['max_optimizer_diff'] == 0.0, cmp['differing']
    summary = soak.summarize(settings, run, cmp)
    assert summary['kills_survived'] == 2 and summary['restarts'] == 2
    assert summary['final_iter'] == 8 and summary['unsafe_files'] == 0
    assert summary['iterations_trained'] == 8 + summary['iterations_redone']
    assert summary['iterations_redone'] >= 1  # kill 1 threw away at least iteration 4
    table = soak.report(summary, run, settings, 'header', 1.0)
    assert '| 8/8 ' in table and 'training step' in table
