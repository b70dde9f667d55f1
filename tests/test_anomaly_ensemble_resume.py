"""A resumed joint ensemble run continues exactly: the member random streams are checkpointed."""
import logging
import os.path as osp

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch.utils.data import Dataset

from eomt_mm.engine.checkpoint import load_checkpoint_weights_only
from test_anomaly_ensemble_training import MAX_NORM, SEEDS, _cfg

MAX_ITERS = 4
HALF = MAX_ITERS // 2


class _Scenes(Dataset):
    """Eight 32x32 images with 3-class block labels and pasted-outlier pixels."""

    def __init__(self):
        gen = torch.Generator().manual_seed(3)
        self.images = (torch.rand(8, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
        labels = torch.randint(0, 3, (8, 4, 4), generator=gen)
        labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
        labels[torch.rand(8, 32, 32, generator=gen) < 0.1] = 254
        self.labels = labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        # New samples every time: the data preprocessor writes into the ones it gets.
        sample = SegDataSample(metainfo=dict(img_shape=(32, 32), ori_shape=(32, 32)))
        sample.gt_sem_seg = PixelData(data=self.labels[index][None].clone())
        return dict(inputs=self.images[index].clone(), data_samples=sample)


class _Crash(Exception):
    pass


class _CrashAfter(Hook):
    """A killed job right after iteration ``n`` (1-based)."""

    def __init__(self, n):
        self.n = n

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.n:
            raise _Crash(f'interrupted after iteration {self.n}')


def _runner(work_dir, name, resume=False, load_from=None, hooks=()):
    torch.manual_seed(0)  # the same initial weights in every run
    model = MODELS.build(_cfg('AdapterEnsembleEoMT', member_seeds=SEEDS,
                              member_clip_grad=dict(max_norm=MAX_NORM)))
    # Masked attention with a keep probability below 1 draws per-query randomness too.
    model.decoder.attn_mask_probs.fill_(0.5)
    return Runner(
        model=model, work_dir=str(work_dir), experiment_name=f'ensemble_resume_{name}',
        train_dataloader=dict(dataset=_Scenes(), batch_size=2, num_workers=0,
                              sampler=dict(type='InfiniteSampler', shuffle=True),
                              collate_fn=dict(type='pseudo_collate')),
        train_cfg=dict(by_epoch=False, max_iters=MAX_ITERS),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.05)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=HALF, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=list(hooks), randomness=dict(seed=7), resume=resume, load_from=load_from,
        default_scope='mmseg')


def _trained(runner):
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()
            if k != '_extra_state'}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    runner = _runner(tmp_path_factory.mktemp('full'), 'full')
    runner.train()
    return _trained(runner), runner.model.member_streams.state_dict()


def test_resumed_joint_run_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    weights, streams = uninterrupted
    with pytest.raises(_Crash):
        _runner(tmp_path, 'crashed', hooks=[_CrashAfter(HALF + 1)]).train()
    checkpoint = osp.join(tmp_path, f'iter_{HALF}.pth')
    saved = load_checkpoint_weights_only(checkpoint)  # plain tensors: weights-only loadable
    saved_streams = saved['state_dict']['_extra_state']['member_streams']
    assert saved_streams['seeds'].tolist() == SEEDS
    assert saved_streams['cpu'].dtype == torch.uint8 and saved_streams['cpu'].shape[0] == 2

    resumed = _runner(tmp_path, 'resumed', resume=True)
    resumed.train()
    assert resumed.iter == MAX_ITERS
    got = _trained(resumed)
    assert got.keys() == weights.keys()
    member_keys = set(resumed.model.member_layout)
    for key, value in weights.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    final = resumed.model.member_streams.state_dict()
    assert all(torch.equal(final[name], streams[name]) for name in streams)

    # The streams matter: resuming from the same checkpoint without them ends elsewhere.
    del saved['state_dict']['_extra_state']
    stripped = str(tmp_path / 'without_streams.pth')
    torch.save(saved, stripped)
    warnings = []

    class _Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    blind = _runner(tmp_path / 'blind', 'blind', resume=True, load_from=stripped)
    handler = _Keep(level=logging.WARNING)
    blind.logger.addHandler(handler)
    try:
        blind.train()
    finally:
        blind.logger.removeHandler(handler)
    assert any('not their random streams' in w for w in warnings)
    differ = [k for k in member_keys if not torch.equal(blind.model.state_dict()[k], weights[k])]
    assert len(differ) == len(member_keys)


def test_member_streams_from_other_seeds_are_not_restored():
    torch.manual_seed(0)
    source = MODELS.build(_cfg('AdapterEnsembleEoMT', member_seeds=SEEDS))
    other = MODELS.build(_cfg('AdapterEnsembleEoMT', member_seeds=[5, 6]))
    before = other.member_streams.state_dict()
    other.load_state_dict(source.state_dict(), strict=True)
    after = other.member_streams.state_dict()
    assert after['seeds'].tolist() == [5, 6] and torch.equal(after['cpu'], before['cpu'])
    same = MODELS.build(_cfg('AdapterEnsembleEoMT', member_seeds=SEEDS))
    with same.member_streams.member(1):
        torch.rand(3)  # move member 1's stream on
    assert not torch.equal(same.member_streams.state_dict()['cpu'],
                           source.member_streams.state_dict()['cpu'])
    same.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(same.member_streams.state_dict()['cpu'],
                       source.member_streams.state_dict()['cpu'])
    with pytest.raises(ValueError, match='member_streams'):
        same.set_extra_state({'streams': 1})
    bad = source.get_extra_state()
    bad['member_streams']['cpu'] = bad['member_streams']['cpu'].float()
    with pytest.raises(ValueError, match='uint8'):
        same.set_extra_state(bad)
