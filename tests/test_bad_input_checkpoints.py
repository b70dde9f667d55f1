"""Files that are no checkpoint, and this project's own checkpoints given to the converter.

* random bytes, an empty file, text or a numpy file are "not a torch checkpoint (corrupt or
  wrong file type)" (they used to be reported as pickled objects outside the allow-list, and
  tools/convert_weights.py passed on torch's advice to load with ``weights_only=False``);
* tools/convert_weights.py reads with the project's one weights-only loader, so its own
  training checkpoints load (they used to be refused), and says they need no conversion.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

from _demo_tools_common import load_tool
from eomt_mm.engine.checkpoint import (NotACheckpointError, UnsafeCheckpointError,
                                       load_checkpoint_weights_only)

convert_weights = load_tool('convert_weights')
UNSAFE_ADVICE = ('weights_only=False', 'weights_only` set to `False`')


def _bad_files(folder: Path) -> dict:
    files = {}
    files['random'] = folder / 'random.pth'
    files['random'].write_bytes(np.random.default_rng(0).bytes(4096))
    files['empty'] = folder / 'empty.pth'
    files['empty'].write_bytes(b'')
    files['text'] = folder / 'notes.pth'
    files['text'].write_text('iteration 100: loss 0.5\n' * 20)
    files['numpy'] = folder / 'array.pth'
    with open(files['numpy'], 'wb') as f:
        np.save(f, np.ones(3))
    good = folder / 'good.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}}, good)
    files['truncated'] = folder / 'truncated.pth'
    files['truncated'].write_bytes(good.read_bytes()[:300])
    return files


@pytest.mark.parametrize('kind', ['random', 'empty', 'text', 'numpy', 'truncated'])
def test_undecodable_file_is_not_a_torch_checkpoint(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(NotACheckpointError) as info:
        load_checkpoint_weights_only(str(path))
    message = str(info.value)
    assert f"Checkpoint file '{path}' is not a torch checkpoint (corrupt or wrong file type" \
        in message
    assert 'allow-list' not in message and 'If you trust this file' not in message
    assert not any(advice in message for advice in UNSAFE_ADVICE)
    assert isinstance(info.value, RuntimeError)


class _Payload:
    """Pickles as a call of os.system: must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_pickled_payload_is_still_refused_as_unsafe(tmp_path):
    marker = tmp_path / 'payload_ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):
        load_checkpoint_weights_only(str(path))
    assert not marker.exists()


@pytest.mark.parametrize('kind', ['random', 'empty', 'truncated'])
def test_convert_weights_names_an_undecodable_file(tmp_path, capsys, kind):
    path = _bad_files(tmp_path)[kind]
    dst = tmp_path / 'out.pth'
    assert convert_weights.main([str(path), str(dst), '--format', 'timm']) == 1
    err = capsys.readouterr().err
    assert 'is not a torch checkpoint (corrupt or wrong file type' in err and str(path) in err
    assert not any(advice in err for advice in UNSAFE_ADVICE)
    assert not dst.exists()


def test_convert_weights_names_an_undecodable_safetensors_file(tmp_path, capsys):
    path = tmp_path / 'model.safetensors'
    path.write_bytes(b'\x00' * 5)
    assert convert_weights.main([str(path), str(tmp_path / 'o.pth'), '--format', 'timm']) == 1
    err = capsys.readouterr().err
    assert f'{path} is not a safetensors file (corrupt or wrong file type' in err


def _training_checkpoint(path: Path) -> None:
    """What mmengine's Runner writes for an EoMT of this project (HistoryBuffer included)."""
    buffer = HistoryBuffer()
    buffer.update(0.5)
    torch.save(dict(
        meta=dict(mmengine_version='0.10.7', iter=6, cfg="model = dict(type='EoMT')"),
        state_dict={'backbone.cls_token': torch.zeros(1, 1, 8),
                    'decoder.queries.weight': torch.zeros(4, 8)},
        message_hub=dict(log_scalars={'train/loss': buffer}),
        optimizer=dict(state={}, param_groups=[])), path)


def test_convert_weights_reads_own_training_checkpoint_and_points_at_load_from(
        tmp_path, capsys):
    src = tmp_path / 'iter_6.pth'
    _training_checkpoint(src)
    # The project's loader reads it (HistoryBuffer is allow-listed) ...
    assert load_checkpoint_weights_only(str(src))['meta']['iter'] == 6
    dst = tmp_path / 'converted.pth'
    dst.write_bytes(b'previous file')
    # ... and the converter says it needs none (it used to refuse reading it).
    assert convert_weights.main([str(src), str(dst), '--format', 'eomt']) == 1
    err = capsys.readouterr().err
    assert 'is a training checkpoint' in err and 'needs no conversion' in err
    assert f"load_from='{src}'" in err
    assert 'weights_only=True' not in err and 'allow-list' not in err
    assert dst.read_bytes() == b'previous file'


def test_convert_weights_on_an_already_converted_backbone(tmp_path, capsys):
    src = tmp_path / 'dinov2_converted.pth'
    torch.save(dict(meta=dict(format_version=1, source_format='timm', backbone={}),
                    state_dict={'backbone.cls_token': torch.zeros(1, 1, 8)}), src)
    assert convert_weights.main([str(src), str(tmp_path / 'o.pth'), '--format', 'timm']) == 1
    err = capsys.readouterr().err
    assert "already converted (by tools/convert_weights.py from 'timm')" in err
    assert "init_cfg=dict(type='Pretrained'" in err
