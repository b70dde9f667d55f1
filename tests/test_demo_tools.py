"""tools/train.py, tools/test.py and tools/dist_train.sh on the demo config
(tiny EoMT + LoRA, configs/eomt_lora_demo.py) for a few CPU iterations."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import CheckpointHook

from _demo_tools_common import (CKPT_INTERVAL, DEMO_CONFIG, MAX_ITERS,
                                NUM_VAL, TOOLS, data_options, load_tool,
                                make_demo_data, run_options, state_dict_of,
                                train_args)
from _engine_tiny_seg import HELPER_MODULE, _HOOKS_SRC, subprocess_env
from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
from eomt_mm.engine.hooks import RNGStateHook, add_rng_state_hook


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_tools')
    data_root = make_demo_data(root / 'demo')
    train, test = load_tool('train'), load_tool('test')
    work_dir = root / 'full'
    train.main(train_args(work_dir, data_root, tag='full'))
    return dict(root=root, data_root=data_root, train=train, test=test,
                full=work_dir)


def test_train_writes_checkpoints_and_test_evaluates(demo, tmp_path):
    work_dir = demo['full']
    assert (work_dir / f'iter_{CKPT_INTERVAL}.pth').is_file()
    ckpt = load_checkpoint_weights_only(str(work_dir / f'iter_{MAX_ITERS}.pth'))
    assert ckpt['meta']['iter'] == MAX_ITERS
    # The RNG-state hook added by tools/train.py stored torch's state.
    assert ckpt['torch_rng_state'][0]['cpu'].dtype == torch.uint8
    # LoRA trained, the frozen base did not: compare with iteration 3.
    early = state_dict_of(work_dir / f'iter_{CKPT_INTERVAL}.pth')
    final = ckpt['state_dict']
    lora = [k for k in final if 'lora_B' in k]
    base = [k for k in final if k.endswith('attn.qkv.weight')]
    assert lora and base
    assert any(not torch.equal(final[k], early[k]) for k in lora)
    assert all(torch.equal(final[k], early[k]) for k in base)

    show_dir = tmp_path / 'vis'
    test_dir = tmp_path / 'test'
    metrics = demo['test'].main([
        str(DEMO_CONFIG),
        str(work_dir / f'iter_{MAX_ITERS}.pth'), '--work-dir',
        str(test_dir), '--show-dir',
        str(show_dir), '--cfg-options', *run_options('test'),
        *data_options(demo['data_root'])
    ])
    assert 0.0 <= metrics['mIoU'] <= 100.0
    assert 0.0 < metrics['aAcc'] <= 100.0
    # One painted prediction per validation image.
    painted = list(show_dir.rglob('*.png'))
    assert len(painted) == NUM_VAL
    # mmengine's log of the evaluation holds the same mIoU.
    logs = list(test_dir.rglob('*.json'))
    assert logs
    records = [json.loads(line) for log in logs
               for line in log.read_text().splitlines() if line.strip()]
    assert any(abs(r.get('mIoU', -1) - metrics['mIoU']) < 1e-6
               for r in records)


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(
        demo, tmp_path, monkeypatch):
    work_dir = tmp_path / 'interrupted'
    original = CheckpointHook.after_train_iter

    def crash_after_checkpoint(self, runner, batch_idx, data_batch=None,
                               outputs=None):
        original(self, runner, batch_idx, data_batch, outputs)
        if runner.iter + 1 == CKPT_INTERVAL:
            raise RuntimeError('simulated kill after the checkpoint')

    # A kill right after the iteration-3 checkpoint was written.
    monkeypatch.setattr(CheckpointHook, 'after_train_iter',
                        crash_after_checkpoint)
    with pytest.raises(RuntimeError, match='simulated kill'):
        demo['train'].main(train_args(work_dir, demo['data_root'],
                                      tag='crash'))
    monkeypatch.setattr(CheckpointHook, 'after_train_iter', original)
    assert (work_dir / f'iter_{CKPT_INTERVAL}.pth').is_file()
    assert not (work_dir / f'iter_{MAX_ITERS}.pth').exists()
    # The interrupted run trained the same 3 iterations as the full run.
    for key, value in state_dict_of(
            demo['full'] / f'iter_{CKPT_INTERVAL}.pth').items():
        assert torch.equal(
            state_dict_of(work_dir / f'iter_{CKPT_INTERVAL}.pth')[key],
            value), key

    demo['train'].main(
        train_args(work_dir, demo['data_root'], tag='resume',
                   flags=['--resume']))
    resumed = load_checkpoint_weights_only(
        str(work_dir / f'iter_{MAX_ITERS}.pth'))
    assert resumed['meta']['iter'] == MAX_ITERS
    full = state_dict_of(demo['full'] / f'iter_{MAX_ITERS}.pth')
    assert resumed['state_dict'].keys() == full.keys()
    for key, value in full.items():
        # Bit-identical: same data order, augmentation, dropout masks and
        # sampled loss points as the uninterrupted run.
        assert torch.equal(resumed['state_dict'][key], value), key
    # The resumed run's log starts at iteration 4.
    logs = sorted(work_dir.glob('*/*.log'))
    assert re.search(r'Iter\(train\) \[4/6\]', logs[-1].read_text())
    assert not re.search(r'Iter\(train\) \[1/6\]', logs[-1].read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.dist
def test_dist_train_two_cpu_processes_lora_demo(demo):
    """GPUS=2 tools/dist_train.sh on the LoRA demo config: frozen base, no
    find_unused_parameters, both ranks end with identical weights."""
    root = demo['root'] / 'dist'
    root.mkdir()
    # The engine tests' rank-state hook, imported by a config that extends
    # the demo config (custom_hooks is a list: restate the demo's hooks).
    (root / f'{HELPER_MODULE}.py').write_text(_HOOKS_SRC)
    cfg = root / 'demo_dist.py'
    cfg.write_text(
        f"_base_ = [{str(DEMO_CONFIG)!r}]\n"
        "custom_imports = dict(imports=['eomt_mm', "
        f"{HELPER_MODULE!r}], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='TrainableParamsHook'),\n"
        "                dict(type='MaskAnnealingHook', auto_windows=True,"
        " power=0.9),\n"
        "                dict(type='DumpRankState')]\n")
    env = subprocess_env(root)
    env.update(GPUS='2', PORT=str(_free_port()), PYTHON=sys.executable)
    work_dir = root / 'work'
    options = [o for o in run_options('dist') if 'batch_size' not in o]
    # Own process group: on a timeout torchrun's workers are killed too.
    proc = subprocess.Popen(
        ['bash', str(TOOLS / 'dist_train.sh'), str(cfg), '--work-dir',
         str(work_dir), '--cfg-options', *options,
         'train_dataloader.batch_size=1', *data_options(demo['data_root'])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f'dist_train.sh did not finish in 180 s:\n{out[-6000:]}')
    assert proc.returncode == 0, out[-6000:]
    assert 'find_unused_parameters' not in cfg.read_text()
    assert 'unused parameters' not in out

    ranks = [torch.load(work_dir / f'rank{r}.pth', weights_only=True)
             for r in (0, 1)]
    for info in ranks:
        assert info['wrapper'] == 'CpuAwareDistributedDataParallel'
        assert info['backend'] == 'gloo'
        assert info['world_size'] == 2
        assert info['iter'] == MAX_ITERS
    # Each rank read its own shard of the data.
    assert ranks[0]['seen'] != ranks[1]['seen']
    grads = ranks[0]['requires_grad']
    trainable = {n for n, g in grads.items() if g}
    frozen = {n for n, g in grads.items() if not g}
    assert any('lora_A' in n for n in trainable)
    assert 'backbone.layers.0.attn.qkv.weight' in frozen
    assert 'backbone.patch_embed.projection.weight' in frozen
    final0, final1 = ranks[0]['final'], ranks[1]['final']
    assert final0.keys() == final1.keys()
    for key in final0:
        assert torch.equal(final0[key], final1[key]), key
        if key in frozen:
            assert torch.equal(final0[key], ranks[0]['initial'][key]), key
    assert any(not torch.equal(final0[n], ranks[0]['initial'][n])
               for n in trainable if 'lora_B' in n)
    saved = state_dict_of(work_dir / f'iter_{MAX_ITERS}.pth')
    for key, value in saved.items():
        assert torch.equal(value, final1[key]), key


def test_rng_state_hook_unit():
    """Validation leaves torch's generator as it was; a resumed state is
    put back once, before the first step; a checkpoint of another world size
    is not applied."""
    hook = RNGStateHook()
    torch.manual_seed(3)
    hook.after_train_iter(None, 0)
    expected = torch.rand(4)
    torch.manual_seed(3)
    hook.before_val(None)
    torch.rand(100)  # what a validation DataLoader/iteration may draw
    hook.after_val(None)
    assert torch.equal(torch.rand(4), expected)

    checkpoint = {}
    torch.manual_seed(5)
    hook.after_train_iter(None, 0)
    hook.before_save_checkpoint(None, checkpoint)
    after_save = torch.rand(4)
    torch.rand(10)  # a fresh process consumes something else
    warnings = []
    runner = SimpleNamespace(
        _resume=True, logger=SimpleNamespace(warning=warnings.append))
    resumed = RNGStateHook()
    resumed.after_load_checkpoint(runner, checkpoint)
    resumed.before_train_iter(runner, 0)
    assert torch.equal(torch.rand(4), after_save)
    state = torch.get_rng_state()
    resumed.before_train_iter(runner, 1)  # only once
    assert torch.equal(torch.get_rng_state(), state)

    two_ranks = dict(torch_rng_state=checkpoint['torch_rng_state'] * 2)
    other = RNGStateHook()
    other.after_load_checkpoint(runner, two_ranks)
    assert other._pending is None
    assert '2 process(es) but 1 are running' in warnings[0]

    cfg = Config(dict(custom_hooks=[dict(type='TrainableParamsHook')]))
    assert add_rng_state_hook(cfg)
    assert not add_rng_state_hook(cfg)
    assert [h['type'] for h in cfg.custom_hooks] == [
        'TrainableParamsHook', 'RNGStateHook']
