"""Anomaly scores against plainly written per-pixel formulas (MSP, MaxLogit, entropy, energy, RbA, EAM)."""
import math

import pytest
import torch

from eomt_mm.anomaly.scores import SCORE_NAMES, compute_anomaly_scores, semantic_map

B, Q, K, H, W = 2, 5, 4, 3, 4


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def _reference_pixel(c, m, b, y, x):
    """All six scores of one pixel, written out with Python floats."""
    probs = [_softmax(c[b, qi].tolist()) for qi in range(Q)]
    sig = [_sigmoid(float(m[b, qi, y, x])) for qi in range(Q)]
    sem = [sum(probs[qi][k] * sig[qi] for qi in range(Q)) for k in range(K)]
    logit_map = [sum(float(c[b, qi, k]) * sig[qi] for qi in range(Q)) for k in range(K)]
    total = sum(sem)
    norm = [s / total for s in sem]
    return {
        'msp': 1.0 - max(sem),
        'maxlogit': -max(logit_map),
        'entropy': -sum(p * math.log(p) for p in norm if p > 0),
        'energy': -math.log(sum(math.exp(s) for s in sem)),
        'rba': -sum(math.tanh(s) for s in sem),
        'eam': 1.0 - sum(sig[qi] * max(probs[qi][:K]) for qi in range(Q)),
    }


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('chunk', [1 << 20, 5])
def test_scores_match_per_pixel_formulas(dtype, chunk):
    gen = torch.Generator().manual_seed(1)
    c = (torch.randn(B, Q, K + 1, generator=gen) * 3).to(dtype)
    m = (torch.randn(B, Q, H, W, generator=gen) * 4).to(dtype)
    out = compute_anomaly_scores(c, m, list(SCORE_NAMES), chunk_pixels=chunk)
    assert list(out) == list(SCORE_NAMES)
    for name, value in out.items():
        assert value.shape == (B, H, W) and value.dtype == torch.float32, name
    for b in range(B):
        for y in range(H):
            for x in range(W):
                ref = _reference_pixel(c.double(), m.double(), b, y, x)
                for name in SCORE_NAMES:
                    assert out[name][b, y, x].item() == pytest.approx(ref[name], rel=1e-5,
                                                                      abs=1e-5), (name, b, y, x)


def test_semantic_map_and_known_values():
    # One query, certain of class 0, mask fully on (sigmoid(+inf) = 1): S = (1, 0, ..., 0).
    c = torch.full((1, 1, K + 1), -1e4)
    c[0, 0, 0] = 1e4
    m = torch.full((1, 1, 2, 2), 1e4)
    sem = semantic_map(c, m)
    assert sem.shape == (1, K, 2, 2)
    assert torch.allclose(sem[0, 0], torch.ones(2, 2))
    assert torch.allclose(sem[0, 1:], torch.zeros(K - 1, 2, 2))
    out = compute_anomaly_scores(c, m, ['msp', 'entropy', 'rba', 'eam', 'energy'])
    assert torch.allclose(out['msp'], torch.zeros(1, 2, 2))
    assert torch.allclose(out['entropy'], torch.zeros(1, 2, 2))
    assert torch.allclose(out['eam'], torch.zeros(1, 2, 2))
    assert torch.allclose(out['rba'], torch.full((1, 2, 2), -math.tanh(1.0)))
    assert torch.allclose(out['energy'], torch.full((1, 2, 2), -math.log(math.e + K - 1)))
    # All mass on no-object: S = 0, the normalised distribution is undefined -> uniform limit
    # is not claimed; the score must still be finite.
    c2 = torch.full((1, 1, K + 1), -1e4)
    c2[0, 0, -1] = 1e4
    out2 = compute_anomaly_scores(c2, m, ['msp', 'entropy', 'rba'])
    assert torch.allclose(out2['msp'], torch.ones(1, 2, 2))
    assert torch.allclose(out2['rba'], torch.zeros(1, 2, 2))
    assert torch.isfinite(out2['entropy']).all()


def test_semantic_map_gradients_flow():
    c = torch.randn(1, 3, K + 1, requires_grad=True)
    m = torch.randn(1, 3, 2, 2, requires_grad=True)
    s = -torch.tanh(semantic_map(c, m)).sum()
    s.backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    # The no-object logit changes S through the softmax normalisation only.
    assert m.grad is not None and m.grad.abs().sum() > 0


def test_unknown_name_lists_valid_ones():
    c = torch.randn(1, 2, K + 1)
    m = torch.randn(1, 2, 2, 2)
    with pytest.raises(ValueError) as err:
        compute_anomaly_scores(c, m, ['msp', 'odin'])
    for name in ('odin',) + SCORE_NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match='valid names'):
        compute_anomaly_scores(c, m, [])
    # Case-insensitive, duplicates dropped, a single string works.
    out = compute_anomaly_scores(c, m, ['MSP', 'msp'])
    assert list(out) == ['msp']
    assert list(compute_anomaly_scores(c, m, 'rba')) == ['rba']


def test_bad_shapes():
    with pytest.raises(ValueError, match=r'\[B, Q, K\+1\]'):
        compute_anomaly_scores(torch.randn(2, K + 1), torch.randn(1, 2, 2, 2), 'msp')
    with pytest.raises(ValueError, match='disagree'):
        compute_anomaly_scores(torch.randn(1, 3, K + 1), torch.randn(1, 2, 2, 2), 'msp')
    with pytest.raises(ValueError, match=r'\[B, Q, H, W\]'):
        compute_anomaly_scores(torch.randn(1, 2, K + 1), torch.randn(1, 2, 4), 'msp')
