"""ONNX export (eomt_mm.export, tools/export_onnx.py): onnxruntime equals PyTorch.

The references are the segmentor's own inference: ``AnomalyEoMT.predict`` on the images run
through the config's data preprocessor (BGR in, as mmseg's pipelines decode them), with the
LoRA model unmerged; the exported graph gets the same images as RGB. Exports take tens of
seconds on 2 cores, hence the ``slow`` marker on those tests.
"""
import importlib.util
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from eomt_mm.anomaly.scores import SCORE_NAMES
from eomt_mm.engine.hooks.lora_checkpoint_hook import strip_frozen_base
from eomt_mm.export import (ExportableEoMT, ExportError, InputNormalization, check_export_size,
                            compare_with_onnxruntime)
from eomt_mm.lora import LoRALinear, save_adapter
from eomt_mm.models.utils.geometry import crop_windows, stitch_windows, window_layout

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(REPO, 'configs', 'eomt_lora_demo.py')
TOLERANCE = 1e-4


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        '_eomt_export_onnx_tool', osp.join(REPO, 'tools', 'export_onnx.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()

TINY_CONFIG = '''
default_scope = 'mmseg'
custom_imports = dict(imports=['eomt_mm'], allow_failed_imports=False)
randomness = dict(seed=1)
model = dict(
    type='AnomalyEoMT',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[120.0, 110.0, 100.0],
                           std=[60.0, 55.0, 50.0], bgr_to_rgb={bgr_to_rgb}, pad_val=0,
                           seg_pad_val=255),
    backbone=dict(type='{backbone}', arch=dict(embed_dims=32, num_layers=3, num_heads=2,
                  feedforward_channels=64), patch_size=8, img_size=32, num_register_tokens=2),
    decoder=dict(type='EoMTDecoder', num_classes=5, num_queries=6, num_blocks=1, num_points=64),
    test_cfg=dict(mode='whole'),
    lora_config=dict(enabled=True, rank=4, lora_alpha=8, lora_dropout=0.1,
                     target_modules=['qkv', 'proj', 'fc1', 'fc2'], freeze_base_model=True))
'''


def write_config(folder, backbone='DINOv2', bgr_to_rgb=True):
    path = folder / f'tiny_{backbone}_{bgr_to_rgb}.py'
    path.write_text(TINY_CONFIG.format(backbone=backbone, bgr_to_rgb=bgr_to_rgb))
    return str(path)


def build(config, lora=True, scores=SCORE_NAMES):
    """The config's model in eval mode (seeded as the tool builds it), anomaly scores on."""
    cfg = Config.fromfile(config)
    init_default_scope('mmseg')
    model_cfg = cfg.model.to_dict() if lora else tool.without_lora(cfg.model.to_dict())
    model_cfg['test_cfg'] = dict(mode='whole', anomaly_scores=list(scores))
    torch.manual_seed(cfg.get('randomness', {}).get('seed', 0))
    model = MODELS.build(model_cfg)
    model.init_weights()  # as the Runner does: the base an adapter-only checkpoint relies on
    return model.eval()


def trained_lora_model(config):
    """The LoRA model with non-zero lora_B (a live adapter) and perturbed heads."""
    model = build(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'lora_B' in name or name.startswith('decoder.'):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    return model


def rgb_images(height, width, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.uint8)


def reference(model, rgb):
    """``predict`` of the PyTorch model on the images as mmseg feeds them (BGR uint8)."""
    samples = []
    for _ in range(rgb.shape[0]):
        sample = SegDataSample()
        sample.set_metainfo(dict(img_shape=tuple(rgb.shape[-2:]), ori_shape=tuple(rgb.shape[-2:])))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=list(rgb.flip(1)), data_samples=samples), False)
    with torch.no_grad():
        out = model.predict(data['inputs'], data['data_samples'])
    result = dict(seg_scores=torch.stack([s.seg_logits.data for s in out]))
    for name in model.anomaly_scores:
        result[f'anomaly_{name}'] = torch.cat([s.anomaly_scores.get(name) for s in out])
    return result


def run_onnx(path, images):
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {'images': images.numpy()})))


def assert_close(got, expected, what):
    expected = expected.float().numpy()
    assert got.shape == expected.shape, f'{what}: {got.shape} vs {expected.shape}'
    diff = np.abs(got - expected).max() / np.abs(expected).max()
    assert diff <= TOLERANCE, f'{what}: relative max difference {diff:.2e}'


def export(argv):
    assert tool.main([str(a) for a in argv]) == 0


@pytest.fixture
def tiny(tmp_path):
    """(config, full LoRA checkpoint, trained LoRA model)."""
    config = write_config(tmp_path)
    model = trained_lora_model(config)
    checkpoint = tmp_path / 'lora_full.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), str(checkpoint))
    return config, str(checkpoint), model


# ------------------------------------------------------------------------ fast checks
def test_bad_size_is_an_export_time_error(tiny, tmp_path, capsys):
    config, checkpoint, _ = tiny
    out = tmp_path / 'bad.onnx'
    assert tool.main([config, checkpoint, str(out), '--size', '36', '64']) == 1
    err = capsys.readouterr().err
    assert 'height 36 is not a multiple of the patch size 8' in err and '32 or 40' in err
    assert not out.exists()
    with pytest.raises(ExportError, match='width 8'):
        check_export_size(16, 8, 8)  # a single patch is not enough either
    check_export_size(16, 24, 8)


def test_loaders_merge_every_checkpoint_kind(tiny, tmp_path):
    """Full, adapter-only, adapter-folder and merged checkpoints give the same merged model."""
    config, checkpoint, model = tiny
    images = rgb_images(32, 48)
    expected = reference(model, images)
    only = dict(state_dict=dict(model.state_dict()), meta=dict())
    strip_frozen_base(model, only)
    torch.save(only, str(tmp_path / 'adapter_only.pth'))
    save_adapter(model, str(tmp_path / 'adapter'))
    merged, _, _ = tool.load_merged_model(config, checkpoint)
    torch.save(dict(state_dict=merged.state_dict()), str(tmp_path / 'merged.pth'))
    kinds = []
    for path in (checkpoint, tmp_path / 'adapter_only.pth', tmp_path / 'adapter',
                 tmp_path / 'merged.pth'):
        loaded, normalization, kind = tool.load_merged_model(config, str(path))
        kinds.append(kind)
        assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
        module = ExportableEoMT(loaded, normalization, scores=['msp'])
        with torch.no_grad():
            (scores, msp) = module(images)
        assert_close(scores.numpy(), expected['seg_scores'], f'{kind} seg_scores')
        assert_close(msp.numpy(), expected['anomaly_msp'], f'{kind} msp')
    assert kinds[1].startswith('adapter-only') and kinds[2].startswith('adapter')
    assert 'already merged' in kinds[3]


def test_wrapper_refuses_unmerged_lora_and_bad_names(tiny):
    _, _, model = tiny
    normalization = InputNormalization((0., 0., 0.), (1., 1., 1.), False)
    with pytest.raises(ValueError, match='merge_lora'):
        ExportableEoMT(model, normalization)
    plain = build(tiny[0], lora=False)
    with pytest.raises(ValueError, match='unknown outputs'):
        ExportableEoMT(plain, normalization, outputs=['logits'])
    with pytest.raises(ValueError, match='unknown anomaly score'):
        ExportableEoMT(plain, normalization, scores=['rbaa'])


def test_normalization_from_config():
    rgb = InputNormalization.from_config(dict(type='SegDataPreProcessor', mean=[1, 2, 3],
                                              std=[4, 5, 6], bgr_to_rgb=True))
    assert rgb == InputNormalization((1., 2., 3.), (4., 5., 6.), rgb_to_bgr=False)
    bgr = InputNormalization.from_config(dict(type='SegDataPreProcessor', mean=[1, 2, 3],
                                              std=[4, 5, 6]))
    assert bgr.rgb_to_bgr
    none = InputNormalization.from_config(dict(type='SegDataPreProcessor'))
    assert none.mean == (0., 0., 0.) and none.std == (1., 1., 1.)
    with pytest.raises(ValueError, match='SegDataPreProcessor'):
        InputNormalization.from_config(dict(type='DetDataPreprocessor'))
    with pytest.raises(ValueError, match='both mean and std'):
        InputNormalization.from_config(dict(type='SegDataPreProcessor', mean=[1, 2, 3]))


# ------------------------------------------------------------------------ exports
@pytest.mark.slow
def test_lora_checkpoint_all_outputs_and_sliding_windows(tmp_path):
    """(a) LoRA checkpoint unmerged, BGR-trained model, every output and score, float input."""
    config = write_config(tmp_path, bgr_to_rgb=False)
    model = trained_lora_model(config)
    checkpoint = tmp_path / 'bgr_lora.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), str(checkpoint))
    out = tmp_path / 'tiny.onnx'
    export([config, checkpoint, out, '--size', 32, '--input-dtype', 'float32',
            '--outputs', 'seg_scores', 'class_logits', 'mask_logits', '--scores', *SCORE_NAMES])
    images = rgb_images(32, 32, batch=3)
    got = run_onnx(str(out), images.float())
    expected = reference(model, images)
    assert sorted(got) == sorted(['seg_scores', 'class_logits', 'mask_logits'] +
                                 [f'anomaly_{n}' for n in SCORE_NAMES])
    for name, value in expected.items():
        assert_close(got[name], value, name)
    assert got['mask_logits'].shape == (3, 6, 8, 8)
    # Sliding windows around the fixed-size graph equal the model's slide mode.
    model.test_cfg = dict(mode='slide', crop_size=32)
    wide = rgb_images(32, 80, batch=2, seed=3)
    layout = window_layout(32, 80, 32)
    windows = run_onnx(str(out), crop_windows(wide.float(), layout))
    model_slide = reference(model, wide)
    stitched = stitch_windows(torch.from_numpy(windows['seg_scores']), layout, wide.shape[0])
    assert_close(stitched.numpy(), model_slide['seg_scores'], 'sliding windows')
    # The short side equals the crop (no resize): each window's anomaly map is the one
    # AnomalyEoMT scores on its footprint, and averaging the overlaps is its stitching.
    for name in SCORE_NAMES:
        maps = torch.from_numpy(windows[f'anomaly_{name}'])[:, None]
        stitched = stitch_windows(maps, layout, wide.shape[0])[:, 0]
        assert_close(stitched.numpy(), model_slide[f'anomaly_{name}'], f'sliding {name}')


@pytest.mark.slow
def test_demo_config_model(tmp_path):
    """(b) The demo config's model (random init), its checkpoint, its anomaly scores."""
    cfg = Config.fromfile(DEMO_CONFIG)
    scores = list(cfg.model.test_cfg.anomaly_scores)
    model = trained_lora_model(DEMO_CONFIG)
    checkpoint = tmp_path / 'demo.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), str(checkpoint))
    out = tmp_path / 'demo.onnx'
    export([DEMO_CONFIG, checkpoint, out, '--size', 128, 256, '--scores', *scores])
    images = rgb_images(128, 256, batch=1)
    got = run_onnx(str(out), images)
    expected = reference(model, images)
    assert sorted(got) == sorted(['seg_scores'] + [f'anomaly_{n}' for n in scores])
    for name, value in got.items():
        assert_close(value, expected[name], name)


@pytest.mark.slow
def test_dynamic_size_runs_two_sizes(tiny, tmp_path):
    """(c) One dynamic export, two sizes (and another batch), each equal to PyTorch."""
    config, checkpoint, model = tiny
    out = tmp_path / 'dynamic.onnx'
    export([config, checkpoint, out, '--size', 32, 48, '--dynamic', '--scores', 'rba', 'msp'])
    for (height, width), batch in (((32, 48), 2), ((56, 24), 1)):
        images = rgb_images(height, width, batch=batch, seed=height)
        got = run_onnx(str(out), images)
        expected = reference(model, images)
        for name in ('seg_scores', 'anomaly_rba', 'anomaly_msp'):
            assert_close(got[name], expected[name], f'{name} at {height}x{width}')


@pytest.mark.slow
def test_dinov3_backbone(tmp_path):
    """The same contract on a DINOv3 backbone (RoPE built from the grid in the graph)."""
    config = write_config(tmp_path, backbone='DINOv3')
    model = trained_lora_model(config)
    checkpoint = tmp_path / 'dinov3.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), str(checkpoint))
    out = tmp_path / 'dinov3.onnx'
    export([config, checkpoint, out, '--size', 32, 40, '--scores', 'entropy', 'eam'])
    images = rgb_images(32, 40)
    got = run_onnx(str(out), images)
    expected = reference(model, images)
    for name in ('seg_scores', 'anomaly_entropy', 'anomaly_eam'):
        assert_close(got[name], expected[name], name)
    merged, normalization, _ = tool.load_merged_model(config, str(checkpoint))
    module = ExportableEoMT(merged, normalization, scores=['entropy', 'eam'])
    diffs = compare_with_onnxruntime(module, str(out), [(32, 40)])
    assert max(diffs[(32, 40)].values()) <= TOLERANCE
