"""tools/train.py and tools/test.py on a tiny mmseg config, single process:
flags, --resume after a crash, --amp on CPU, evaluation outputs."""
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from _engine_tiny_seg import write_tiny_setup
from eomt_mm.engine.amp import enable_amp, fall_back_to_fp32_on_cpu
from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
from eomt_mm.engine.dist import prepare_cpu_distributed

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
MAX_ITERS = 4


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'_eomt_tool_{name}',
                                                  TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('tools')
    cfg = write_tiny_setup(root, max_iters=MAX_ITERS, ckpt_interval=2,
                           crash_after=3)
    sys.path.insert(0, str(root))
    yield dict(root=root, cfg=cfg, train=_load_tool('train'),
               test=_load_tool('test'))
    sys.path.remove(str(root))


def _train(tiny, work_dir, name, *extra):
    tiny['train'].main([
        str(tiny['cfg']), '--work-dir',
        str(work_dir), '--cfg-options', f'experiment_name={name}', *extra
    ])
    return torch.load(work_dir / 'rank0.pth', weights_only=True)


def test_train_resume_after_crash_matches_uninterrupted_run(
        tiny, tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match='AmpOptimWrapper needs a GPU'):
        full = _train(tiny, tmp_path / 'full', 'full', '--amp', 'bf16')
    assert full['optim_wrapper'] == 'OptimWrapper'  # CPU: fp32 fallback
    assert full['wrapper'] != 'CpuAwareDistributedDataParallel'

    work_dir = tmp_path / 'crashed'
    monkeypatch.setenv('EOMT_TEST_CRASH', '1')
    with pytest.raises(RuntimeError, match='simulated crash after iter 3'):
        _train(tiny, work_dir, 'crashed')
    monkeypatch.delenv('EOMT_TEST_CRASH')
    assert (work_dir / 'iter_2.pth').is_file()
    assert not (work_dir / 'iter_4.pth').exists()
    saved = load_checkpoint_weights_only(str(work_dir / 'iter_2.pth'))

    resumed = _train(tiny, work_dir, 'resumed', '--resume')
    # The resumed run started from iteration 2: it trained 2 more batches.
    assert resumed['iter'] == MAX_ITERS
    assert len(resumed['seen']) == (MAX_ITERS - 2) * 2
    for key, value in saved['state_dict'].items():
        assert torch.equal(resumed['initial'][key], value), key
    # ... and ends bit-identical to the uninterrupted run with the same seed.
    for key, value in full['final'].items():
        assert torch.equal(resumed['final'][key], value), key
    assert resumed['seen'] == full['seen'][-len(resumed['seen']):]

    # --resume CHECKPOINT resumes from that file.
    again = _train(tiny, tmp_path / 'from_file', 'from_file', '--resume',
                   str(work_dir / 'iter_2.pth'))
    for key, value in full['final'].items():
        assert torch.equal(again['final'][key], value), key

    # test.py evaluates the checkpoint, writes painted and raw predictions.
    show_dir, out_dir = tmp_path / 'vis', tmp_path / 'preds'
    metrics = tiny['test'].main([
        str(tiny['cfg']),
        str(work_dir / f'iter_{MAX_ITERS}.pth'), '--work-dir',
        str(tmp_path / 'test'), '--show-dir',
        str(show_dir), '--out',
        str(out_dir), '--cfg-options', 'experiment_name=test'
    ])
    assert 0.0 <= metrics['mIoU'] <= 100.0
    assert len(list(out_dir.glob('*.png'))) == 8
    assert len(list(show_dir.rglob('*.png'))) == 8


def test_missing_files_are_named(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.py'):
        tiny['train'].main([str(tmp_path / 'nope.py')])
    with pytest.raises(FileNotFoundError, match='--resume.*missing.pth'):
        tiny['train'].main(
            [str(tiny['cfg']), '--resume',
             str(tmp_path / 'missing.pth')])
    with pytest.raises(FileNotFoundError, match='Checkpoint.*gone.pth'):
        tiny['test'].main([str(tiny['cfg']), str(tmp_path / 'gone.pth')])


def test_amp_flags():
    cfg = Config(dict(optim_wrapper=dict(optimizer=dict(type='SGD', lr=1.))))
    enable_amp(cfg, 'bf16')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.dtype == 'bfloat16'
    enable_amp(cfg, 'fp16')
    assert cfg.optim_wrapper.dtype == 'float16'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    # With a GPU nothing changes; without one AMP is dropped, loudly.
    assert not fall_back_to_fp32_on_cpu(cfg, cuda_available=True)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    with pytest.warns(UserWarning, match='fp32'):
        assert fall_back_to_fp32_on_cpu(cfg, cuda_available=False)
    assert cfg.optim_wrapper.to_dict() == dict(
        type='OptimWrapper', optimizer=dict(type='SGD', lr=1.))
    with pytest.raises(ValueError, match="one of \\['bf16', 'fp16'\\]"):
        enable_amp(cfg, 'fp8')
    bad = Config(dict(optim_wrapper=dict(type='OptimWrapperDict')))
    with pytest.raises(ValueError, match='OptimWrapperDict'):
        enable_amp(bad, 'fp16')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not fall_back_to_fp32_on_cpu(
            Config(dict(optim_wrapper=dict(type='OptimWrapper'))),
            cuda_available=False)


def test_cpu_distributed_preparation_errors(monkeypatch):
    cfg = Config(dict(model=dict()))
    assert not prepare_cpu_distributed(cfg, 'none')
    assert 'model_wrapper_cfg' not in cfg
    with pytest.raises(ValueError, match='--launcher slurm needs GPUs'):
        prepare_cpu_distributed(cfg, 'slurm')
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                'MASTER_PORT'):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match='torchrun environment'):
        prepare_cpu_distributed(cfg, 'pytorch')
    for var, value in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0',
                           MASTER_ADDR='127.0.0.1', MASTER_PORT='1').items():
        monkeypatch.setenv(var, value)
    custom = Config(dict(model_wrapper_cfg=dict(
        type='MMSeparateDistributedDataParallel')))
    with pytest.raises(ValueError, match='MMSeparateDistributedDataParallel'):
        prepare_cpu_distributed(custom, 'pytorch')
    fsdp = Config(dict(strategy=dict(type='FSDPStrategy')))
    with pytest.raises(ValueError, match='FSDPStrategy.*needs GPUs'):
        prepare_cpu_distributed(fsdp, 'pytorch')


def test_resume_survives_an_empty_or_stale_last_checkpoint_record(tiny, tmp_path):
    pick = tiny['train'].checkpoint_behind_broken_record
    assert pick(str(tmp_path)) is None  # no record: mmengine starts from scratch
    record = tmp_path / 'last_checkpoint'
    record.write_text('')
    with pytest.raises(FileNotFoundError, match='last_checkpoint is empty.*no iter_'):
        pick(str(tmp_path))
    for name in ('iter_2.pth', 'iter_10.pth', 'iter_9.pth', 'best_mIoU_iter_12.pth'):
        (tmp_path / name).write_bytes(b'x')
    # Numeric order, not string order; best_* files are not training checkpoints.
    assert pick(str(tmp_path)) == str(tmp_path / 'iter_10.pth')
    record.write_text(str(tmp_path / 'iter_11.pth'))
    assert pick(str(tmp_path)) == str(tmp_path / 'iter_10.pth')
    record.write_text(str(tmp_path / 'iter_9.pth') + '\n')
    assert pick(str(tmp_path)) is None  # a usable record is mmengine's business
    # The fallback reaches the runner's config.
    record.write_text('')
    args = tiny['train'].parse_args([str(tiny['cfg']), '--work-dir', str(tmp_path),
                                     '--resume'])
    cfg = tiny['train'].build_cfg(args)
    assert cfg.resume is True and cfg.load_from == str(tmp_path / 'iter_10.pth')


def test_single_kept_checkpoint_is_warned_about():
    from mmengine.logging import MMLogger

    from eomt_mm.engine.runner import warn_single_kept_checkpoint
    logger = MMLogger.get_current_instance()
    records = []

    class Keep(__import__('logging').Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        one = Config(dict(default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                                             max_keep_ckpts=1))))
        assert warn_single_kept_checkpoint(one)
        assert any('max_keep_ckpts=1' in m and 'keep 2 or more' in m for m in records)
        for keep in (2, -1):
            cfg = Config(dict(default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                                                 max_keep_ckpts=keep))))
            assert not warn_single_kept_checkpoint(cfg)
        assert not warn_single_kept_checkpoint(Config(dict()))
    finally:
        logger.removeHandler(handler)
