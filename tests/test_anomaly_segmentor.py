"""AnomalyEoMT: the anomaly-enabled EoMT is a drop-in replacement with the same weights."""
import pytest
import torch
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from eomt_mm.models.segmentors.structures import InferenceOutputs


def _cfg(model_type='EoMT', test_cfg=None, **kw):
    return dict(
        type=model_type,
        backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=3, num_heads=2,
                                               feedforward_channels=64),
                      img_size=32, patch_size=16, num_register_tokens=4),
        decoder=dict(type='EoMTDecoder', num_classes=4, num_queries=6, num_blocks=2,
                     num_points=64),
        test_cfg=test_cfg, **kw)


def test_plain_eomt_refuses_anomaly_scores_and_names_the_fix():
    with pytest.raises(ValueError, match="type='AnomalyEoMT'"):
        MODELS.build(_cfg(test_cfg=dict(mode='whole', anomaly_scores=['msp'])))


def test_checkpoints_load_both_ways_and_predictions_agree():
    torch.manual_seed(0)
    plain = MODELS.build(_cfg())
    anomaly = MODELS.build(_cfg('AnomalyEoMT', dict(mode='whole', anomaly_scores=['msp', 'rba']),
                                outlier_loss=dict(type='RbALoss')))
    assert list(plain.state_dict()) == list(anomaly.state_dict())
    anomaly.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(anomaly.state_dict(), strict=True)
    plain.eval(), anomaly.eval()
    img = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        a = plain.predict(img, [SegDataSample(), SegDataSample()])
        b = anomaly.predict(img, [SegDataSample(), SegDataSample()])
    for x, y in zip(a, b):
        torch.testing.assert_close(x.seg_logits.data, y.seg_logits.data, rtol=0, atol=0)
        assert 'anomaly_scores' not in x and set(y.anomaly_scores.keys()) == {'msp', 'rba'}


def test_outlier_loss_must_follow_the_contract():
    with pytest.raises(TypeError, match='OutlierExposureLoss'):
        MODELS.build(_cfg('AnomalyEoMT', outlier_loss=dict(type='mmseg.CrossEntropyLoss')))


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_inference_outputs_have_the_same_fields_in_both_modes(mode):
    torch.manual_seed(0)
    test_cfg = dict(mode=mode, crop_size=32) if mode == 'slide' else dict(mode=mode)
    model = MODELS.build(_cfg(test_cfg=test_cfg)).eval()
    with torch.no_grad():
        out = model.inference(torch.randn(2, 3, 32, 64))
    assert isinstance(out, InferenceOutputs)
    windows = 2 if mode == 'slide' else 1
    assert out.seg_logits.shape == (2, 4, 32, 64)
    assert out.mask_logits.shape[:2] == (2 * windows, 6)
    assert out.class_logits.shape == (2 * windows, 6, 5)
    assert (out.layout is None) == (mode == 'whole')


def test_one_block_loop_serves_extract_feat_and_inference():
    torch.manual_seed(0)
    model = MODELS.build(_cfg()).eval()
    img = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        tokens, = model.extract_feat(img)
        mask_logits, class_logits = model.decoder.predict(tokens, (2, 3),
                                                          model.backbone.num_prefix_tokens)
        expected = model.forward_logits(img)
    assert tokens.shape == (1, 6 + 5 + 6, 32)
    torch.testing.assert_close(mask_logits, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(class_logits, expected[1], rtol=0, atol=0)
