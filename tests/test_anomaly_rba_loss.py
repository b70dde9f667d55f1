"""RbA outlier loss against its formula; gradients reach class and mask logits."""
import math

import pytest
import torch
from mmseg.registry import MODELS

from eomt_mm.anomaly.outlier_loss import rba_hinge_loss, rba_score


def test_hinge_loss_formula():
    score = torch.tensor([[[-1.0, 0.5, 2.0], [3.0, 6.0, 4.0]]])
    target = torch.tensor([[[0, 0, 255], [1, 1, 1]]])
    # ID pixels -1, 0.5 -> relu(s)^2 = 0, 0.25 ; OOD 3, 6, 4 -> relu(5 - s)^2 = 4, 0, 1
    expected = 0.5 * (0.25 / 2) + 0.5 * (5 / 3)
    assert rba_hinge_loss(score, target).item() == pytest.approx(expected)
    assert rba_hinge_loss(score, target, inlier_margin=-2.0, outlier_margin=4.0).item() == (
        pytest.approx(0.5 * (1 + 6.25) / 2 + 0.5 * 1 / 3))
    only_id = torch.zeros_like(target)
    assert rba_hinge_loss(score, only_id).item() == pytest.approx(0.5 * (0.25 + 4 + 9 + 36 + 16)
                                                                  / 6)
    with pytest.raises(ValueError, match='same shape'):
        rba_hinge_loss(score, target[..., :2])


@pytest.mark.parametrize('source', ['probs', 'logits'])
def test_module_score_and_gradients(source):
    c = torch.randn(2, 4, 6, requires_grad=True)
    m = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.randint(0, 2, (2, 5, 5))
    target[0, 0, 0] = 255
    loss_mod = MODELS.build(dict(type='RbALoss', score_source=source, loss_weight=2.0))
    loss = loss_mod(c, m, target)
    # Plain formula for one pixel of the score.
    probs = (c[0].softmax(-1)[:, :-1] if source == "probs" else c[0][:, :-1]).detach()
    sig = m[0, :, 1, 2].sigmoid().detach()
    s = -sum(math.tanh(float((probs[:, k] * sig).sum())) for k in range(5))
    assert rba_score(c, m, source)[0, 1, 2].item() == pytest.approx(s, rel=1e-5)
    ref = 2.0 * rba_hinge_loss(rba_score(c, m, source), target)
    assert loss.item() == pytest.approx(ref.item())
    loss.backward()
    assert c.grad.abs().sum() > 0 and m.grad.abs().sum() > 0
    assert loss_mod.loss_name == 'loss_rba'
    with pytest.raises(ValueError, match='score_source'):
        MODELS.build(dict(type='RbALoss', score_source='energy'))
