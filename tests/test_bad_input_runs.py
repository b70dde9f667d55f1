"""Faults around a training run, through tools/train.py on a tiny mmseg config:

* a writer killed while saving leaves ``.iter_N.pth.<pid>.<uuid>.tmp``: removed (and
  logged) when the next run starts;
* ``last_checkpoint`` naming a truncated file: ``--resume`` falls back to the newest intact
  checkpoint with a warning (it used to stop);
* a missing label file: refused when the dataset is built, before anything is written (it
  used to surface mid-training as a bare file-system error);
* ``MaskAnnealingHook(auto_windows=True)`` with a short schedule names itself and the ways
  out; resuming a finished run says so (it used to exit without a word); a relative data
  path from another working directory shows where it was resolved.
"""
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config

from _demo_tools_common import load_tool, snapshot
from _engine_tiny_seg import write_tiny_setup
from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
from eomt_mm.engine.data_check import check_data_folders
from eomt_mm.engine.hooks import MaskAnnealingHook

MAX_ITERS = 4


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    cfg = write_tiny_setup(root, max_iters=MAX_ITERS, ckpt_interval=2, crash_after=99)
    sys.path.insert(0, str(root))
    yield SimpleNamespace(root=root, cfg=cfg, train=load_tool('train'))
    sys.path.remove(str(root))


def _train(tiny, work_dir, *options, flags=()):
    name = f'runs_{uuid.uuid4().hex[:8]}'
    return tiny.train.main([str(tiny.cfg), '--work-dir', str(work_dir), *flags,
                            '--cfg-options', f'experiment_name={name}', *options])


def _last_log(work_dir: Path) -> str:
    return sorted(work_dir.glob('*/*.log'))[-1].read_text()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_writers_are_removed_at_start(tiny, tmp_path):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    stale = work_dir / f'.iter_2.pth.{_dead_pid()}.{uuid.uuid4().hex}.tmp'
    stale.write_bytes(b'\0' * 1000)
    live = work_dir / f'.iter_2.pth.{__import__("os").getpid()}.{uuid.uuid4().hex}.tmp'
    live.write_bytes(b'still being written')
    other = work_dir / 'notes.tmp'
    other.write_text('not a temporary file of the atomic writer')
    _train(tiny, work_dir)
    assert not stale.exists()
    assert live.exists() and other.exists()
    log = _last_log(work_dir)
    assert f'removed {stale} (1,000 bytes)' in log and 'killed while saving' in log
    assert (work_dir / f'iter_{MAX_ITERS}.pth').is_file()


def test_resume_falls_back_when_last_checkpoint_is_truncated(tiny, tmp_path, capfd):
    work_dir = tmp_path / 'work'
    _train(tiny, work_dir)
    newest = work_dir / f'iter_{MAX_ITERS}.pth'
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(newest)
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 3])  # a copy cut short
    capfd.readouterr()
    _train(tiny, work_dir, 'train_cfg.max_iters=6', flags=['--resume'])
    # Said before the Runner (and its log file) exists: on the console.
    out = ''.join(capfd.readouterr())
    assert re.search(rf'last_checkpoint names .*iter_{MAX_ITERS}\.pth.*which is truncated', out)
    assert f'resuming from the newest intact checkpoint in the work dir, ' \
           f'{work_dir / "iter_2.pth"}' in out
    assert 'Iter(train) [3/6]' in _last_log(work_dir)
    final = load_checkpoint_weights_only(str(work_dir / 'iter_6.pth'))
    assert final['meta']['iter'] == 6
    # The fallback checkpoint is intact and was not touched.
    assert load_checkpoint_weights_only(str(work_dir / 'iter_2.pth'))['meta']['iter'] == 2


def test_missing_label_is_refused_before_anything_is_written(tiny, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny.root / 'data', data)
    (data / 'ann' / '005.png').unlink()
    work_dir = tmp_path / 'work'
    with pytest.raises(FileNotFoundError) as info:
        _train(tiny, work_dir, f'train_dataloader.dataset.data_root={data}')
    message = str(info.value)
    assert 'train_dataloader: 1 of 8 images have no label file' in message
    assert f"image '{data / 'img' / '005.png'}': label '{data / 'ann' / '005.png'}' " \
           'does not exist' in message
    assert 'nothing was written' in message
    assert not work_dir.exists()


def test_resuming_a_finished_run_says_so_and_keeps_the_files(tiny, tmp_path, capsys):
    work_dir = tmp_path / 'work'
    _train(tiny, work_dir)
    before = snapshot(work_dir)
    assert _train(tiny, work_dir, flags=['--resume']) is None  # exit status 0
    after = snapshot(work_dir)
    assert after == before
    log = _last_log(work_dir)
    assert f'nothing to train: the run in {work_dir} resumed at iteration {MAX_ITERS}, ' \
           f'and train_cfg.max_iters is {MAX_ITERS}' in log
    assert 'train_cfg.max_iters=8' in log
    assert 'Advance dataloader' not in log  # the data is not walked through again


def test_relative_data_path_from_another_folder_names_where_it_looked(tiny, tmp_path,
                                                                      monkeypatch):
    cfg = Config.fromfile(str(tiny.cfg))
    cfg.train_dataloader.dataset.data_root = 'data'
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        check_data_folders(cfg, ['train_dataloader'])
    message = str(info.value)
    assert f"folder 'data' (resolved to '{tmp_path / 'data'}') does not exist" in message
    assert f"resolved from the working directory '{tmp_path}'" in message
    assert f"They exist under '{tiny.root}': run from there" in message


class _EoMTLike(torch.nn.Module):

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.register_buffer('attn_mask_probs', torch.ones(2))


def test_mask_annealing_short_schedule_names_the_hook_and_the_ways_out():
    cfg = Config(dict(custom_hooks=[dict(type='TrainableParamsHook'),
                                    dict(type='MaskAnnealingHook', auto_windows=True)]))
    runner = SimpleNamespace(model=_EoMTLike(), max_iters=4, iter=0, cfg=cfg)
    with pytest.raises(ValueError) as info:
        MaskAnnealingHook(auto_windows=True).before_train(runner)
    message = str(info.value)
    assert message.startswith('MaskAnnealingHook(auto_windows=True): the schedule has '
                              'max_iters=4')
    assert 'custom_hooks.1.auto_windows=False custom_hooks.1.start_iters=' in message
    assert 'remove the hook from custom_hooks' in message
    # The windows it suggests are valid for this model.
    hook = MaskAnnealingHook(start_iters=[0, 1], end_iters=[1, 2])
    hook.before_train(runner)
    assert runner.model.decoder.attn_mask_probs.tolist() == [1.0, 1.0]
