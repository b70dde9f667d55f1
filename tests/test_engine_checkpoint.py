"""Weights-only resume / load_from with mmengine's Runner, refusal of
arbitrary pickles, atomic checkpoint writes (eomt_mm.engine.checkpoint), and
their installation into mmengine (eomt_mm.engine.safe_checkpoint)."""
import collections
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import mmengine
import numpy as np
import pytest
import torch
from mmengine.evaluator import BaseMetric
from mmengine.fileio import get_file_backend
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader, save_checkpoint
from torch import nn
from torch.utils.data import Dataset

from _engine_tiny_seg import subprocess_env
from eomt_mm.engine.checkpoint import (UnsafeCheckpointError,
                                       is_weights_only_loader,
                                       load_checkpoint_weights_only,
                                       load_from_local_weights_only)
from eomt_mm.engine.safe_checkpoint import (SUPPORTED_MMENGINE_VERSIONS,
                                            AtomicLocalBackend,
                                            UnsupportedMMEngineError,
                                            install_safe_checkpointing,
                                            is_installed)

REPO = Path(__file__).resolve().parents[1]

MAX_ITERS = 6
CKPT_INTERVAL = 3


class _TinyModel(BaseModel):
    """Two layers, the first frozen at build (as a frozen base would be)."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, inputs, targets=None, mode='tensor'):
        logits = self.head(torch.relu(self.frozen(inputs)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, targets))
        return [dict(pred=p, target=t) for p, t in zip(logits, targets)]


class _Points(Dataset):
    metainfo = dict(classes=('a', 'b', 'c'), palette=[[0, 0, 0], [1, 1, 1],
                                                       [2, 2, 2]])

    def __init__(self):
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(24, 4, generator=gen)
        self.y = torch.randint(0, 3, (24, ), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], targets=self.y[i])


class _Accuracy(BaseMetric):
    """Returns a numpy scalar as mmseg's metrics do, so numpy objects end up
    in the checkpoint's message hub (best score, logged metrics)."""

    def process(self, data_batch, data_samples):
        for sample in data_samples:
            self.results.append(
                float(sample['pred'].argmax() == sample['target']))

    def compute_metrics(self, results):
        return dict(acc=np.float64(np.mean(results)) * 100)


class _Crash(Exception):
    pass


class _CrashAfter(Hook):
    """Simulates a killed job right after iteration ``n`` (1-based)."""

    def __init__(self, n):
        self.n = n

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.n:
            raise _Crash(f'interrupted after iter {self.n}')


def _runner(work_dir, name, resume=False, load_from=None, hooks=()):
    loader = dict(
        dataset=_Points(),
        sampler=dict(type='DefaultSampler', shuffle=True),
        batch_size=4,
        collate_fn=dict(type='default_collate'))
    torch.manual_seed(0)  # same initial weights for every run
    return Runner(
        model=_TinyModel(),
        work_dir=str(work_dir),
        # mmengine keys its DefaultScope by experiment name + timestamp (to the second); a
        # name shared with another test file's mmseg-scoped run in the same second would hand
        # that run this file's 'mmengine' scope.
        experiment_name=f'engine_checkpoint_{name}',
        train_dataloader=loader,
        val_dataloader=loader,
        val_evaluator=[_Accuracy()],
        val_cfg=dict(),
        train_cfg=dict(
            by_epoch=False, max_iters=MAX_ITERS, val_interval=CKPT_INTERVAL),
        optim_wrapper=dict(
            optimizer=dict(type='AdamW', lr=0.05, weight_decay=0.01)),
        param_scheduler=[
            dict(type='PolyLR', eta_min=1e-4, power=0.9, by_epoch=False)
        ],
        default_hooks=dict(
            checkpoint=dict(
                type='CheckpointHook',
                interval=CKPT_INTERVAL,
                by_epoch=False,
                save_best='acc',
                rule='greater'),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=list(hooks),
        randomness=dict(seed=7),
        resume=resume,
        load_from=load_from,
        default_scope='mmengine')


def _optimizer_state(runner):
    return runner.optim_wrapper.optimizer.state_dict()


def _assert_same_optimizer_state(a, b):
    assert a['param_groups'][0]['lr'] == pytest.approx(
        b['param_groups'][0]['lr'], rel=0, abs=0)
    assert a['state'].keys() == b['state'].keys()
    for key in a['state']:
        for name, value in a['state'][key].items():
            other = b['state'][key][name]
            if torch.is_tensor(value):
                torch.testing.assert_close(value, other, rtol=0, atol=0)
            else:
                assert value == other


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('full')
    runner = _runner(work_dir, 'full')
    runner.train()
    return dict(
        work_dir=work_dir,
        weights={k: v.clone()
                 for k, v in runner.model.state_dict().items()},
        optim=_optimizer_state(runner))


def test_mmengine_checkpoint_globals_are_exactly_allow_listed(uninterrupted):
    ckpt = str(uninterrupted['work_dir'] / f'iter_{MAX_ITERS}.pth')
    # What mmengine writes beyond torch's own weights-only set ...
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(ckpt))
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
    assert any(name.startswith('numpy') for name in unsafe)
    # ... is refused by torch without the allow-list (we add nothing
    # process-wide) ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)
    # ... and loads through ours, with the objects intact.
    ckpt_dict = load_checkpoint_weights_only(ckpt)
    hub = ckpt_dict['message_hub']
    loss = hub['log_scalars']['train/loss']
    assert isinstance(loss, HistoryBuffer)
    assert np.isfinite(loss.mean()) and loss.min() <= loss.max()
    assert isinstance(hub['runtime_info']['best_score'], np.floating)
    assert ckpt_dict['meta']['iter'] == MAX_ITERS
    assert ckpt_dict['meta']['dataset_meta']['classes'] == ('a', 'b', 'c')
    assert torch.equal(ckpt_dict['state_dict']['head.weight'],
                       uninterrupted['weights']['head.weight'])
    assert 'HistoryBuffer' not in str(
        torch.serialization.get_safe_globals())


def test_resume_continues_at_right_iteration_with_optimizer_state(
        tmp_path, uninterrupted):
    with pytest.raises(_Crash):
        _runner(tmp_path, 'crashed', hooks=[_CrashAfter(4)]).train()
    # The crash came after iter 4; the last checkpoint is iter 3.
    assert (tmp_path / 'iter_3.pth').is_file()
    assert not (tmp_path / 'iter_6.pth').exists()
    saved = load_checkpoint_weights_only(str(tmp_path / 'iter_3.pth'))

    resumed = _runner(tmp_path, 'resumed', resume=True)
    started_at = {}

    class _Record(Hook):

        def before_train(self, runner):
            started_at['iter'] = runner.iter
            started_at['optim'] = {
                k: {n: v.clone() if torch.is_tensor(v) else v
                    for n, v in s.items()}
                for k, s in _optimizer_state(runner)['state'].items()
            }
            started_at['lr'] = _optimizer_state(
                runner)['param_groups'][0]['lr']

    resumed.register_hook(_Record())
    resumed.train()

    assert started_at['iter'] == CKPT_INTERVAL
    assert resumed.iter == MAX_ITERS
    # The optimizer state at the start of the resumed run is the saved one.
    _assert_same_optimizer_state(
        dict(state=started_at['optim'],
             param_groups=[dict(lr=started_at['lr'])]), saved['optimizer'])
    # Frozen parameters never had optimizer state.
    names = [n for n, p in resumed.model.named_parameters() if p.requires_grad]
    assert names == ['head.weight', 'head.bias']
    assert len(saved['optimizer']['state']) == 2
    # Same seed, same data order: the resumed run ends exactly where the
    # uninterrupted one did.
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(
            value, uninterrupted['weights'][key], rtol=0, atol=0)
    _assert_same_optimizer_state(
        _optimizer_state(resumed), uninterrupted['optim'])
    assert not any(p.name.endswith('.tmp') for p in tmp_path.iterdir())


def test_load_from_loads_weights(tmp_path, uninterrupted):
    ckpt = str(uninterrupted['work_dir'] / f'iter_{MAX_ITERS}.pth')
    runner = _runner(tmp_path, 'load_from', load_from=ckpt)
    before = runner.model.state_dict()['head.weight'].clone()
    assert not torch.equal(before, uninterrupted['weights']['head.weight'])
    runner.load_or_resume()
    for key, value in runner.model.state_dict().items():
        assert torch.equal(value, uninterrupted['weights'][key])


class _Payload:
    """Would create ``path`` if it were ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}', ))


class _DictSubclass(collections.OrderedDict):
    pass


class _GetattrEscape:
    """A general ``getattr`` would let a file reach any attribute."""

    def __reduce__(self):
        return (getattr, (HistoryBuffer, '__init__'))


def _mmengine_like_checkpoint(path, extra):
    ckpt = load_checkpoint_weights_only(path)
    ckpt['meta']['extra'] = extra
    return ckpt


@pytest.mark.parametrize('kind', ['os_system', 'dict_subclass', 'getattr',
                                  'object_array'])
def test_foreign_pickles_are_refused(tmp_path, uninterrupted, kind):
    marker = tmp_path / 'PAYLOAD_RAN'
    extra, offending = {
        'os_system': (_Payload(marker), 'system'),
        'dict_subclass': (_DictSubclass(a=1), '_DictSubclass'),
        'getattr': (_GetattrEscape(), "'__init__'"),
        'object_array': (np.array([1, 2], dtype=object), 'ObjectDType'),
    }[kind]
    good = str(uninterrupted['work_dir'] / f'iter_{MAX_ITERS}.pth')
    bad = tmp_path / 'evil.pth'
    torch.save(_mmengine_like_checkpoint(good, extra), bad)

    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_weights_only(str(bad))
    message = str(err.value)
    assert str(bad) in message
    assert offending in message
    assert 'never unpickles arbitrary objects' in message
    assert err.value.filename == str(bad)

    # The same through mmengine's Runner (resume and load_from).
    runner = _runner(tmp_path / 'wd', f'evil_{kind}', resume=True,
                     load_from=str(bad))
    with pytest.raises(UnsafeCheckpointError, match='Refusing to load'):
        runner.train()
    runner = _runner(tmp_path / 'wd2', f'evil2_{kind}', load_from=str(bad))
    with pytest.raises(UnsafeCheckpointError):
        runner.load_or_resume()
    assert not marker.exists()


def test_corrupt_and_missing_files_name_the_file(tmp_path, uninterrupted):
    good = (uninterrupted['work_dir'] / f'iter_{MAX_ITERS}.pth').read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good[:len(good) // 2])
    with pytest.raises(RuntimeError, match='truncated.pth.*truncated or '
                       'corrupt'):
        load_checkpoint_weights_only(str(truncated))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint_weights_only(str(tmp_path / 'nope.pth'))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'sub' / 'ckpt.pth'
    assert isinstance(get_file_backend(str(path)), AtomicLocalBackend)
    save_checkpoint({'w': torch.ones(3)}, str(path))
    assert torch.equal(load_checkpoint_weights_only(str(path))['w'],
                       torch.ones(3))
    old_bytes = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError, match='No space left'):
        save_checkpoint({'w': torch.zeros(1000)}, str(path))
    monkeypatch.undo()
    # The previous checkpoint is untouched and no temporary file is left.
    assert path.read_bytes() == old_bytes
    assert sorted(p.name for p in path.parent.iterdir()) == ['ckpt.pth']

    save_checkpoint({'w': torch.zeros(2)}, str(path))
    assert torch.equal(load_checkpoint_weights_only(str(path))['w'],
                       torch.zeros(2))
    mode = path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_last_checkpoint_record_is_written_atomically(tmp_path, monkeypatch):
    """mmengine's CheckpointHook writes ``last_checkpoint`` with ``open(path, 'w')``; a kill
    between the truncation and the write used to leave it empty (``--resume`` then failed)."""
    import inspect

    from mmengine.hooks import CheckpointHook, checkpoint_hook
    assert "open(save_file, 'w')" in inspect.getsource(
        CheckpointHook._save_checkpoint_with_step)
    record = tmp_path / 'last_checkpoint'
    with checkpoint_hook.open(str(record), 'w') as f:
        f.write('/work/iter_5.pth')
    assert record.read_text() == '/work/iter_5.pth'

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, 'fsync', killed)
    with pytest.raises(KeyboardInterrupt):
        with checkpoint_hook.open(str(record), 'w') as f:
            f.write('/work/iter_10.pth')
    monkeypatch.undo()
    assert record.read_text() == '/work/iter_5.pth'
    assert [p.name for p in tmp_path.iterdir()] == ['last_checkpoint']
    # Without a with block, close() writes it.
    f = checkpoint_hook.open(str(record), 'w')
    f.write('/work/iter_15.pth')
    assert record.read_text() == '/work/iter_5.pth'
    f.close()
    assert record.read_text() == '/work/iter_15.pth'
    record.write_text('/work/iter_5.pth')
    # Reads (and binary modes) are the builtin open.
    with checkpoint_hook.open(str(record)) as f:
        assert f.read() == '/work/iter_5.pth'


def test_allow_list_is_scoped_and_keeps_user_globals(uninterrupted):
    ckpt = str(uninterrupted['work_dir'] / f'iter_{MAX_ITERS}.pth')
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([np.dtype])
    try:
        load_checkpoint_weights_only(ckpt)
        safe = torch.serialization.get_safe_globals()
        assert np.dtype in safe  # the user's entry survives our context
        assert HistoryBuffer not in safe  # ours is gone after loading
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


# ------------------------------------------------------------ installation into mmengine
def _run_python(tmp_path, script):
    """Run ``script`` in a fresh interpreter (nothing installed yet); its last stdout line
    is JSON."""
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(script)],
                          capture_output=True, text=True, cwd=str(tmp_path),
                          env=subprocess_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_MMENGINE_STATE = """
    import builtins, json
    import mmengine
    from mmengine.fileio import LocalBackend
    from mmengine.fileio.backends import registry_utils
    from mmengine.hooks import checkpoint_hook
    from mmengine.runner import checkpoint as mm_checkpoint
    from eomt_mm.engine.checkpoint import is_weights_only_loader
    from eomt_mm.engine.safe_checkpoint import is_installed

    def state():
        schemes = mm_checkpoint.CheckpointLoader._schemes
        return dict(
            local_is_mmengine=schemes[''] is mm_checkpoint.load_from_local,
            any_weights_only=any(is_weights_only_loader(f) for f in schemes.values()),
            local_backend=registry_utils.backends['local'] is LocalBackend
            and registry_utils.prefix_to_backends[''] is LocalBackend,
            hook_open_is_builtin='open' not in vars(checkpoint_hook),
            installed=is_installed())
"""

_UNTOUCHED = dict(local_is_mmengine=True, any_weights_only=False,
                  local_backend=True, hook_open_is_builtin=True,
                  installed=False)


def test_import_eomt_mm_leaves_mmengine_untouched(tmp_path):
    """``import eomt_mm`` only registers; a refused installation changes nothing either."""
    out = _run_python(tmp_path, _MMENGINE_STATE + """
    import importlib
    import eomt_mm
    after_import = state()
    mmengine.__version__ = '0.11.0'
    try:
        importlib.import_module('eomt_mm.engine.safe_checkpoint_install')
        refusal = None
    except Exception as err:  # the error type is checked below
        refusal = type(err).__name__ + ': ' + str(err)
    print(json.dumps(dict(after_import=after_import, after_refusal=state(),
                          refusal=refusal)))
    """)
    assert out['after_import'] == _UNTOUCHED
    assert out['after_refusal'] == _UNTOUCHED
    assert out['refusal'].startswith('UnsupportedMMEngineError')
    assert 'found mmengine 0.11.0' in out['refusal']


def test_custom_imports_module_installs_safe_checkpointing(tmp_path):
    """mmseg's own tools/train.py loads the config with ``Config.fromfile``, which imports
    ``custom_imports``: default_runtime.py's list installs everything."""
    runtime = REPO / 'configs' / '_base_' / 'default_runtime.py'
    out = _run_python(tmp_path, _MMENGINE_STATE + f"""
    import torch
    from mmengine.config import Config
    from mmengine.fileio import get_file_backend
    from mmengine.logging.history_buffer import HistoryBuffer
    from eomt_mm.engine.checkpoint import load_from_local_weights_only
    from eomt_mm.engine.safe_checkpoint import (AtomicLocalBackend,
                                                install_safe_checkpointing)

    before = state()
    cfg = Config.fromfile({str(runtime)!r})
    after = state()
    schemes = mm_checkpoint.CheckpointLoader._schemes
    snapshot = dict(schemes)
    install_safe_checkpointing()  # explicit call after the import: no change
    again = mm_checkpoint.CheckpointLoader._schemes
    buffer = HistoryBuffer()
    buffer.update(0.5)
    torch.save(dict(state_dict=dict(w=torch.ones(2)),
                    message_hub=dict(log_scalars=dict(loss=buffer))), 'ckpt.pth')
    loaded = mm_checkpoint.CheckpointLoader.load_checkpoint('ckpt.pth', 'cpu')
    print(json.dumps(dict(
        imports=cfg.custom_imports['imports'], before=before, after=after,
        local_is_ours=schemes[''] is load_from_local_weights_only,
        atomic_backend=isinstance(get_file_backend('x.pth'), AtomicLocalBackend),
        second_call_same=again is schemes and all(
            again[k] is v for k, v in snapshot.items()) and len(again) == len(snapshot),
        loaded_loss=loaded['message_hub']['log_scalars']['loss'].current())))
    """)
    assert out['imports'] == ['eomt_mm', 'eomt_mm.engine.safe_checkpoint_install']
    assert out['before'] == _UNTOUCHED
    assert out['after'] == dict(local_is_mmengine=False, any_weights_only=True,
                                local_backend=False, hook_open_is_builtin=False,
                                installed=True)
    assert out['local_is_ours'] and out['atomic_backend']
    assert out['second_call_same']
    assert out['loaded_loss'] == 0.5


def test_install_is_idempotent():
    from mmengine.hooks import checkpoint_hook
    assert is_installed()  # tests/conftest.py installed it
    schemes = CheckpointLoader._schemes
    snapshot = dict(schemes)
    hook_open = checkpoint_hook.open
    install_safe_checkpointing()
    install_safe_checkpointing()
    assert CheckpointLoader._schemes is schemes
    assert {k: id(v) for k, v in schemes.items()} == {
        k: id(v) for k, v in snapshot.items()}
    assert checkpoint_hook.open is hook_open
    # A loader registered later (another package's scheme) is wrapped once, on the next
    # call; the others stay the same objects and nothing is wrapped twice.

    def load_from_test_scheme(filename, map_location=None):
        return {'loaded': filename}

    CheckpointLoader.register_scheme('eomt-test://', load_from_test_scheme)
    try:
        assert not is_installed()
        install_safe_checkpointing()
        assert is_installed()
        wrapped = CheckpointLoader._schemes['eomt-test://']
        assert is_weights_only_loader(wrapped)
        assert wrapped.__wrapped__ is load_from_test_scheme
        assert wrapped('eomt-test://x') == {'loaded': 'eomt-test://x'}
        install_safe_checkpointing()
        assert CheckpointLoader._schemes['eomt-test://'] is wrapped
        for key, loader in snapshot.items():
            assert CheckpointLoader._schemes[key] is loader
        assert CheckpointLoader._schemes[''] is load_from_local_weights_only
    finally:
        CheckpointLoader._schemes.pop('eomt-test://', None)


def test_unsupported_mmengine_version_is_refused(monkeypatch):
    monkeypatch.setattr(mmengine, '__version__', '0.9.1')
    with pytest.raises(UnsupportedMMEngineError) as err:
        install_safe_checkpointing()
    message = str(err.value)
    assert 'found mmengine 0.9.1' in message  # the version found
    assert f'written for mmengine {SUPPORTED_MMENGINE_VERSIONS[0]}' in message
    assert "pip install 'mmengine==0.10.7'" in message  # what to do
    assert 'SUPPORTED_MMENGINE_VERSIONS' in message
    assert 'nothing was changed' in message
