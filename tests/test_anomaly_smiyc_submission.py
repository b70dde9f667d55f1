"""SMIYC submission files (eomt_mm.anomaly.smiyc.submission) against the benchmark's own files.

``tests/fixtures/smiyc_reference.json`` records the files the benchmark's
``Evaluation.save_output`` wrote for three generated frames (paths, HDF5 key, dtype,
compression) and the npz what its evaluation's reader read back from them.
"""
import json
import os
import os.path as osp

import numpy as np
import pytest

h5py = pytest.importorskip('h5py', reason='the submission writer needs the smiyc extra (h5py)')

from eomt_mm.anomaly.smiyc import (SubmissionWriter, read_submission_frame,  # noqa: E402
                                   to_submission_scores)
from eomt_mm.anomaly.smiyc import submission as submission_module  # noqa: E402

FIXTURE = osp.join(osp.dirname(__file__), 'fixtures', 'smiyc_reference')


@pytest.fixture(scope='module')
def reference():
    with open(FIXTURE + '.json') as f:
        header = json.load(f)
    with np.load(FIXTURE + '.npz') as z:
        arrays = {k: z[k] for k in z.files}
    return header['results']['submission'], arrays


def test_written_files_match_the_benchmarks(tmp_path, reference):
    expected, arrays = reference
    writer = SubmissionWriter(tmp_path / 'submission', expected['method_name'])
    for entry in expected['files']:
        score = arrays[f"frames/{entry['frame']}/score"]  # float32, as the model gives
        path = writer.write(entry['dataset'], entry['frame'], score)
        assert osp.relpath(path, tmp_path / 'submission') == entry['path']
        with h5py.File(path, 'r') as handle:
            assert list(handle.keys()) == entry['keys']
            stored = handle['value']
            assert str(stored.dtype) == entry['dtype']
            assert list(stored.shape) == entry['shape']
            assert stored.compression == entry['compression']
            assert stored.compression_opts == entry['compression_opts']
        read = read_submission_frame(path)
        benchmark_read = arrays[f"submission/{entry['dataset']}/{entry['frame']}"]
        assert str(read.dtype) == entry['read_dtype']
        np.testing.assert_array_equal(read, benchmark_read)
    assert writer.frames == {'AnomalyTrack-all': ['large', 'negative'],
                             'LostAndFound-test': ['ties']}
    text = writer.upload_instructions()
    assert 'AnomalyTrack-all: 2 frames' in text and 'LostAndFound-test: 1 frames' in text
    assert f"anomaly_p/{expected['method_name']}/" in text
    # A partial split is said to be one (the benchmark's sizes of AnomalyTrack-all / LAF test).
    assert ("AnomalyTrack-all: 2 frames (incomplete: the benchmark's AnomalyTrack-all has 110"
            in text)
    assert "LostAndFound-test: 1 frames (incomplete: the benchmark's LostAndFound-test has 1203" \
        in text
    # Only the score files (no temporary leftovers).
    found = sorted(osp.relpath(osp.join(root, name), tmp_path / 'submission')
                   for root, _, names in os.walk(tmp_path / 'submission') for name in names)
    assert found == sorted(entry['path'] for entry in expected['files'])


def test_complete_split_is_not_flagged(tmp_path):
    writer = SubmissionWriter(tmp_path / 'out', 'method')
    score = np.zeros((2, 3), np.float32)
    for i in range(110):
        writer.write('AnomalyTrack-all', f'frame{i:04d}', score + i)
    writer.write('ObstacleTrack-all', 'curvy-street_1', score)  # the benchmark states no size
    text = writer.upload_instructions()
    assert 'AnomalyTrack-all: 110 frames\n' in text and 'ObstacleTrack-all: 1 frames\n' in text
    assert 'incomplete' not in text


def test_submission_scores_are_float16_of_the_map():
    score = np.linspace(-3, 3, 12, dtype=np.float32).reshape(1, 3, 4)
    stored = to_submission_scores(score)
    assert stored.dtype == np.float16 and stored.shape == (3, 4)
    np.testing.assert_array_equal(stored, score[0].astype(np.float16))


def test_existing_non_empty_folder_is_refused(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    SubmissionWriter(out, 'method')  # an empty folder is fine
    (out / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='exists and is not empty'):
        SubmissionWriter(out, 'method')
    assert (out / 'notes.txt').read_text() == 'keep me'
    (tmp_path / 'file').write_text('x')
    with pytest.raises(FileExistsError, match='is not a folder'):
        SubmissionWriter(tmp_path / 'file', 'method')


def test_bad_input_is_a_clear_error(tmp_path):
    writer = SubmissionWriter(tmp_path / 'out', 'method')
    score = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="unknown SMIYC dataset 'RoadAnomaly21'"):
        writer.write('RoadAnomaly21', 'frame', score)
    with pytest.raises(ValueError, match='no path separators'):
        writer.write('ObstacleTrack-all', '../frame', score)
    with pytest.raises(ValueError, match='no path separators'):
        SubmissionWriter(tmp_path / 'other', 'a/b')
    with pytest.raises(ValueError, match='overflow the float16'):
        writer.write('ObstacleTrack-all', 'frame', score + 1e5)
    with pytest.raises(ValueError, match='NaN or inf'):
        writer.write('ObstacleTrack-all', 'frame', score + np.nan)
    with pytest.raises(ValueError, match=r'\[H, W\]'):
        writer.write('ObstacleTrack-all', 'frame', np.zeros((2, 4, 6), np.float32))
    with pytest.raises(TypeError, match='floating point'):
        writer.write('ObstacleTrack-all', 'frame', np.zeros((4, 6), np.int64))
    writer.write('ObstacleTrack-all', 'frame', score)
    with pytest.raises(FileExistsError, match='appears twice'):
        writer.write('ObstacleTrack-all', 'frame', score + 1)
    np.testing.assert_array_equal(
        read_submission_frame(writer.path_for('ObstacleTrack-all', 'frame')), score)


def test_missing_h5py_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(submission_module, 'h5py', None)
    with pytest.raises(ImportError, match=r'pip install -e \.\[smiyc\]'):
        SubmissionWriter(tmp_path / 'out', 'method')
    assert not osp.exists(tmp_path / 'out')
