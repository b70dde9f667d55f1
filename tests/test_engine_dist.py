"""tools/dist_train.sh and dist_test.sh with 2 CPU processes (gloo)."""
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.model import BaseModel, MMDistributedDataParallel
from mmengine.optim import OptimWrapper
from mmseg.registry import MODEL_WRAPPERS as SEG_MODEL_WRAPPERS
from torch import nn

from _engine_tiny_seg import subprocess_env, write_tiny_setup
from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
from eomt_mm.engine.ddp import module_device_type
from eomt_mm.engine.dist import prepare_cpu_distributed

pytestmark = pytest.mark.dist

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
MAX_ITERS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _run(cmd, env, timeout=150):
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{cmd} failed:\n{out[-6000:]}'
    return out


@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('dist')
    cfg = write_tiny_setup(root, max_iters=MAX_ITERS, ckpt_interval=MAX_ITERS)
    env = subprocess_env(root)
    env.update(GPUS='2', PORT=str(_free_port()), PYTHON=sys.executable)
    work_dir = root / 'work'
    out = _run(['bash', str(TOOLS / 'dist_train.sh'), str(cfg),
                '--work-dir', str(work_dir)], env)
    ranks = [torch.load(work_dir / f'rank{r}.pth', weights_only=True)
             for r in (0, 1)]
    return dict(root=root, cfg=cfg, env=env, work_dir=work_dir, out=out,
                ranks=ranks)


def test_dist_train_two_cpu_processes_stay_in_sync(dist_run):
    rank0, rank1 = dist_run['ranks']
    for info in (rank0, rank1):
        assert info['wrapper'] == 'CpuAwareDistributedDataParallel'
        assert info['device_ids'] is None  # CPU module: no device_ids
        assert info['backend'] == 'gloo'  # the config asked for nccl
        assert info['world_size'] == 2
        assert info['iter'] == MAX_ITERS
        assert info['optim_wrapper'] == 'OptimWrapper'
    # Each rank trained on its own shard of the data.
    assert len(rank0['seen']) == len(rank1['seen']) == MAX_ITERS * 2
    assert rank0['seen'] != rank1['seen']

    frozen = sorted(n for n, g in rank0['requires_grad'].items() if not g)
    trainable = sorted(n for n, g in rank0['requires_grad'].items() if g)
    assert 'backbone.patch_embed.projection.weight' in frozen
    assert 'backbone.layers.0.attn.qkv.weight' in frozen
    assert 'backbone.layers.1.attn.qkv.weight' in trainable
    assert 'decode_head.conv_seg.weight' in trainable

    assert rank0['final'].keys() == rank1['final'].keys()
    for key in rank0['final']:
        # Both ranks hold bit-identical weights after 4 synchronised steps
        # on different data.
        assert torch.equal(rank0['final'][key], rank1['final'][key]), key
        name = key
        if name in frozen:
            assert torch.equal(rank0['final'][key], rank0['initial'][key])
        elif name in trainable and name.endswith('weight'):
            assert not torch.equal(rank0['final'][key],
                                   rank0['initial'][key]), key
    # No find_unused_parameters workaround was needed or used.
    assert 'find_unused_parameters' not in dist_run['cfg'].read_text()
    assert 'unused parameters' not in dist_run['out']

    ckpt = load_checkpoint_weights_only(
        str(dist_run['work_dir'] / f'iter_{MAX_ITERS}.pth'))
    assert ckpt['meta']['iter'] == MAX_ITERS
    for key, value in ckpt['state_dict'].items():
        assert torch.equal(value, rank1['final'][key]), key


def test_dist_test_two_cpu_processes(dist_run):
    env = dict(dist_run['env'], PORT=str(_free_port()))
    ckpt = dist_run['work_dir'] / f'iter_{MAX_ITERS}.pth'
    out = _run(['bash', str(TOOLS / 'dist_test.sh'), str(dist_run['cfg']),
                str(ckpt), '--work-dir', str(dist_run['root'] / 'test')],
               env)
    found = re.search(r'mIoU: (\d+\.\d+)', out)
    assert found, out[-3000:]
    assert 0.0 <= float(found.group(1)) <= 100.0
    assert 'local_weights_only' in out


class _TwoLayers(BaseModel):

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 2)

    def forward(self, inputs, mode='tensor'):
        out = self.head(self.frozen(inputs))
        return dict(loss=out.pow(2).mean()) if mode == 'loss' else out


def test_prepare_and_wrap_in_one_cpu_process(monkeypatch):
    for var, value in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0',
                           MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(var, value)
    assert not torch_dist.is_initialized()
    strategy_cfg = Config(
        dict(strategy=dict(type='DDPStrategy'),
             env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60))))
    try:
        assert prepare_cpu_distributed(strategy_cfg, 'pytorch')
        assert torch_dist.get_backend() == 'gloo'
        assert strategy_cfg.env_cfg.dist_cfg.backend == 'gloo'
        assert strategy_cfg.strategy.model_wrapper.type == (
            'CpuAwareDistributedDataParallel')

        # A second config in the same process: no second init; the
        # config's find_unused_parameters choice is kept.
        runner_cfg = Config(dict(find_unused_parameters=True))
        assert prepare_cpu_distributed(runner_cfg, 'pytorch')
        assert runner_cfg.model_wrapper_cfg.to_dict() == dict(
            type='CpuAwareDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=True)

        # Built the way Runner.wrap_model builds it (device_ids added by
        # mmengine), from mmseg's registry (child of mmengine's).
        model = _TwoLayers()
        frozen_before = model.frozen.weight.clone()
        head_before = model.head.weight.clone()
        wrapper = SEG_MODEL_WRAPPERS.build(
            dict(type='CpuAwareDistributedDataParallel'),
            default_args=dict(module=model, device_ids=[0]))
        assert isinstance(wrapper, MMDistributedDataParallel)
        assert wrapper.device_ids is None
        optim = OptimWrapper(
            torch.optim.SGD(
                [p for p in model.parameters() if p.requires_grad], lr=0.1))
        log = wrapper.train_step(dict(inputs=torch.randn(3, 4)), optim)
        assert log['loss'] > 0
        assert torch.equal(model.frozen.weight, frozen_before)
        assert model.frozen.weight.grad is None
        assert not torch.equal(model.head.weight, head_before)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def test_module_on_several_device_types_is_rejected():
    model = _TwoLayers()
    model.head.to('meta')
    with pytest.raises(ValueError, match="one device type.*'cpu', 'meta'"):
        module_device_type(model)
