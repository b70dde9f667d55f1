"""LoRACheckpointHook and TrainableParamsHook in a real mmengine Runner (CPU)."""
import glob
import io
import os
import os.path as osp
import uuid

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import DataLoader, Dataset, default_collate

from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
from eomt_mm.engine.hooks import LoRACheckpointHook, TrainableParamsHook
from eomt_mm.engine.hooks.lora_checkpoint_hook import ADAPTER_ONLY_META_KEY
from eomt_mm.lora import apply_lora, count_parameters

HIDDEN = 1024


class Mlp(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ToyBackbone(nn.Module):

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.mlp = Mlp(64, HIDDEN)
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        h = self.embed(x)
        return self.norm(h + self.mlp(h))


class ToyModel(BaseModel):
    """Pretrained backbone (from init_cfg) with LoRA on fc1/fc2, plus a new head."""

    def __init__(self, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.backbone = ToyBackbone()
        self.head = nn.Linear(64, 2)
        apply_lora(self, dict(rank=2, lora_alpha=4, target_modules=['fc1', 'fc2']))

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.head(self.backbone(inputs))
        if mode == 'loss':
            return dict(loss=F.mse_loss(out, labels))
        return out


class ToyData(Dataset):

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 8, generator=gen)
        self.y = torch.randn(16, 2, generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


def make_runner(work_dir, base_path, max_iters=6, **kwargs):
    torch.manual_seed(0)
    return Runner(
        model=ToyModel(init_cfg=dict(type='Pretrained', checkpoint=base_path)),
        work_dir=str(work_dir),
        experiment_name=f'lora_hooks_{uuid.uuid4().hex[:8]}',
        train_dataloader=DataLoader(ToyData(), batch_size=4, shuffle=False,
                                    collate_fn=default_collate),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.05, momentum=0.9),
            constructor='TrainableOnlyOptimWrapperConstructor'),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=3, by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='LoRACheckpointHook'), dict(type='TrainableParamsHook')],
        default_scope='mmseg',
        randomness=dict(seed=0),
        **kwargs)


@pytest.fixture
def base_path(tmp_path):
    torch.manual_seed(42)
    plain = nn.Module()
    plain.backbone = ToyBackbone()
    plain.head = nn.Linear(64, 2)
    path = str(tmp_path / 'pretrained.pth')
    torch.save(plain.state_dict(), path)
    return path


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, nn.Parameter) and v.requires_grad}


def test_checkpoints_are_adapter_only_and_resume_continues(tmp_path, base_path):
    runner = make_runner(tmp_path / 'run1', base_path)
    assert any(isinstance(h, LoRACheckpointHook) for h in runner.hooks)
    runner.train()
    final = _adapter_state(runner.model)
    pretrained = torch.load(base_path, weights_only=True)
    frozen = [n for n, p in runner.model.named_parameters() if not p.requires_grad]
    assert set(frozen) == {
        'backbone.embed.weight', 'backbone.embed.bias', 'backbone.mlp.fc1.weight',
        'backbone.mlp.fc1.bias', 'backbone.mlp.fc2.weight', 'backbone.mlp.fc2.bias'
    }
    for name in frozen:  # training never touched the base
        assert torch.equal(runner.model.state_dict()[name], pretrained[name]), name

    ckpt_path = osp.join(tmp_path, 'run1', 'iter_3.pth')
    ckpt = load_checkpoint_weights_only(ckpt_path)
    keys = set(ckpt['state_dict'])
    assert not keys & set(frozen)
    assert {'backbone.mlp.fc1.lora_A', 'backbone.mlp.fc2.lora_B', 'backbone.norm.weight',
            'head.weight', 'head.bias'} <= keys
    assert ckpt['meta'][ADAPTER_ONLY_META_KEY]['keys'] == frozen
    assert ckpt['meta']['iter'] == 3
    # Much smaller than the model's full state dict alone (and this one also holds the
    # optimizer state and the message hub).
    buf = io.BytesIO()
    torch.save(runner.model.state_dict(), buf)
    assert os.path.getsize(ckpt_path) < 0.2 * buf.tell()

    # Resume from iteration 3 in a fresh runner: it continues at 3 and, with the saved
    # momentum restored, ends exactly where the uninterrupted run ended.
    resumed = make_runner(tmp_path / 'run2', base_path, resume=True, load_from=ckpt_path)
    seen = {}

    class Probe(Hook):

        def before_train(self, runner):
            seen['iter'] = runner.iter
            seen['momentum'] = len(runner.optim_wrapper.optimizer.state)

    resumed.register_hook(Probe(), priority='VERY_LOW')
    resumed.train()
    assert seen['iter'] == 3
    assert seen['momentum'] == len([p for p in resumed.model.parameters() if p.requires_grad])
    assert resumed.iter == 6
    got = _adapter_state(resumed.model)
    assert got.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(got[k], final[k], atol=1e-6, rtol=0)
    for name in frozen:
        assert torch.equal(resumed.model.state_dict()[name], pretrained[name]), name
    # The base keys were filled in before loading: none was reported missing (the
    # pretrained init_cfg load does report the LoRA matrices missing, as it should).
    log = open(glob.glob(osp.join(tmp_path, 'run2', '*', '*.log'))[0]).read()
    assert 'adapter-only checkpoint, 6 frozen base tensors taken' in log
    missing = [line for line in log.splitlines() if 'missing keys' in line]
    assert missing and not [line for line in missing if 'backbone.embed.weight' in line]


def test_resume_on_another_base_is_refused(tmp_path, base_path):
    make_runner(tmp_path / 'run1', base_path, max_iters=3).train()
    other = {k: v * 1.01 for k, v in torch.load(base_path, weights_only=True).items()}
    other_path = str(tmp_path / 'other.pth')
    torch.save(other, other_path)
    runner = make_runner(tmp_path / 'run2', other_path, resume=True,
                         load_from=osp.join(tmp_path, 'run1', 'iter_3.pth'))
    with pytest.raises(RuntimeError, match="frozen base is not the one this checkpoint "
                       "was trained on .*backbone.embed.weight: values differ"):
        runner.train()


def test_hook_without_stripping_keeps_full_checkpoints(tmp_path, base_path):
    runner = make_runner(tmp_path / 'run', base_path, max_iters=3)
    runner._hooks = [h for h in runner.hooks if not isinstance(h, LoRACheckpointHook)]
    runner.register_hook(LoRACheckpointHook(adapter_only=False))
    runner.train()
    ckpt = load_checkpoint_weights_only(osp.join(tmp_path, 'run', 'iter_3.pth'))
    assert 'backbone.mlp.fc1.weight' in ckpt['state_dict']
    assert ADAPTER_ONLY_META_KEY not in ckpt['meta']
    with pytest.raises(TypeError, match='must be bools'):
        LoRACheckpointHook(adapter_only='yes')


def test_trainable_params_hook_logs_counts(tmp_path, base_path):
    runner = make_runner(tmp_path / 'run', base_path, max_iters=1)
    assert any(isinstance(h, TrainableParamsHook) for h in runner.hooks)
    runner.train()
    # Counted by hand: LoRA rank 2 on fc1 (64 -> 1024) and fc2 (1024 -> 64).
    lora = 2 * (64 + HIDDEN) * 2
    trainable = lora + 2 * 64 + (64 * 2 + 2)  # + backbone.norm + head
    total = (8 * 64 + 64) + (64 * HIDDEN + HIDDEN) + (HIDDEN * 64 + 64) + 2 * 64 \
        + (64 * 2 + 2) + lora
    assert count_parameters(runner.model) == dict(
        total=total, trainable=trainable, lora=lora, trainable_pct=100 * trainable / total)
    log = open(glob.glob(osp.join(tmp_path, 'run', '*', '*.log'))[0]).read()
    expected = (f'params: total {total:,} | trainable {trainable:,} '
                f'({100 * trainable / total:.4f}%) | lora {lora:,} | trainable by module: '
                f'backbone={lora + 128:,}, head=130')
    assert expected in log
