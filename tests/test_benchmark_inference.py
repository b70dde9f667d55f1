"""tools/benchmark/inference.py: the converted model pair, the agreement checks, the arithmetic."""
import copy
import json
import os
import sys

import pytest
import torch

pytest.importorskip('transformers')

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools',
                      'benchmark')
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
import inference  # noqa: E402

SIZE = 48  # 3x3 patch grid: small, but not a 1-patch degenerate case
TINY = dict(
    type='EoMT',
    backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=3, num_heads=2,
                                           feedforward_channels=128),
                  img_size=SIZE, patch_size=16, num_register_tokens=4),
    decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=5, num_blocks=2),
    test_cfg=dict(mode='whole'))
LORA = dict(enabled=True, rank=4, lora_alpha=8, lora_dropout=0.1,
            target_modules=['qkv', 'proj', 'fc1', 'fc2'])
ATOL, RTOL = 1e-4, 1e-4


def _outputs(models, x):
    with torch.inference_mode():
        return {name: inference.logits_fn(name, m)(x) for name, m in models.items()}


@pytest.fixture(scope='module')
def variants(tmp_path_factory):
    models = inference.build_variants(TINY, LORA, SIZE, str(tmp_path_factory.mktemp('w')),
                                      seed=3)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return models, x, _outputs(models, x)


def test_hf_config_mirrors_our_model(variants):
    models, _, _ = variants
    cfg = models['hf'].config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.mlp_ratio) == (
        32, 3, 2, 4)
    assert (cfg.num_blocks, cfg.num_queries, cfg.num_labels, cfg.num_register_tokens) == (
        2, 5, 3, 4)
    assert (cfg.image_size, cfg.patch_size, cfg.num_upscale_blocks) == (SIZE, 16, 2)
    assert not bool(models['hf'].attn_mask_probs.any())  # inference: plain attention
    # The weights really are shared, through the conversion tool (e.g. the queries).
    torch.testing.assert_close(models['ours'].decoder.q.weight, models['hf'].query.weight,
                               atol=0, rtol=0)


def test_converted_pair_agrees(variants):
    _, x, outputs = variants
    cls, masks = outputs['ours']
    assert cls.shape == (2, 5, 4) and masks.shape == (2, 5, SIZE // 4, SIZE // 4)
    diffs = inference.agreement(outputs)
    pair = diffs['ours vs hf']
    assert pair['class'] < 1e-5 and pair['mask'] < 1e-5
    assert pair['class_scale'] > 0.1 and pair['mask_scale'] > 0.1  # not trivially zero outputs
    inference.check_agreement(diffs, ATOL, RTOL)  # no raise


def test_agreement_fails_when_a_weight_is_perturbed(variants):
    models, x, outputs = variants
    broken = copy.deepcopy(models['ours'])
    with torch.no_grad():
        broken.backbone.layers[1].attn.qkv.weight[0, 0] += 0.5
    outs = dict(outputs, ours=_outputs({'ours': broken}, x)['ours'])
    diffs = inference.agreement(outs)
    assert diffs['ours vs hf']['mask'] > 1e-3
    with pytest.raises(inference.AgreementError, match='ours vs hf: .* logits differ by'):
        inference.check_agreement(diffs, ATOL, RTOL)


def test_merged_lora_equals_unmerged_and_differs_from_base(variants):
    from eomt_mm.lora import LoRALinear
    models, _, outputs = variants
    assert sum(isinstance(m, LoRALinear) for m in models['lora'].modules()) == 12
    assert not any(isinstance(m, LoRALinear) for m in models['lora_merged'].modules())
    diffs = inference.agreement(outputs)
    assert diffs['lora_merged vs lora']['class'] < 1e-5
    assert diffs['lora_merged vs lora']['mask'] < 1e-5
    live = diffs['lora vs ours']
    assert max(live['class'], live['mask']) > 1e-2


def test_dead_adapter_is_refused(variants):
    models, x, outputs = variants
    dead = copy.deepcopy(models['lora'])
    with torch.no_grad():
        for m in dead.modules():
            if hasattr(m, 'lora_B'):
                m.lora_B.zero_()
    outs = dict(outputs, lora=_outputs({'lora': dead}, x)['lora'])
    with pytest.raises(inference.AgreementError, match='adapter does not change the model'):
        inference.check_agreement(inference.agreement(outs), ATOL, RTOL)


def test_swiglu_backbone_is_refused():
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    cfg = copy.deepcopy(TINY)
    cfg['backbone']['arch']['ffn_type'] = 'swiglu_fused'
    with pytest.raises(ValueError, match='GELU-MLP'):
        inference.hf_config_for(MODELS.build(cfg), SIZE)


def test_summarise_medians_and_ratios():
    # Two rounds; 'ours' 2 s per call (median), 'fast' 1 s, batch 2 -> per image halves.
    calls = {
        'ours': [dict(round=0, wall=2.0, cpu=1.8), dict(round=0, wall=3.0, cpu=2.2),
                 dict(round=1, wall=1.0, cpu=1.0), dict(round=1, wall=2.0, cpu=2.0)],
        'fast': [dict(round=0, wall=1.0, cpu=0.9), dict(round=0, wall=1.5, cpu=1.1),
                 dict(round=1, wall=1.5, cpu=3.0), dict(round=1, wall=0.5, cpu=3.0)],
    }
    rows = inference.summarise(calls, batch=2)
    assert rows['ours']['wall_s'] == pytest.approx(1.0)   # median(2, 3, 1, 2) = 2, / 2
    assert rows['ours']['cpu_s'] == pytest.approx(0.95)   # median(1.8, 2.2, 1, 2) = 1.9
    assert rows['fast']['wall_s'] == pytest.approx(0.625)  # median(1, 1.5, 1.5, .5) = 1.25
    assert rows['fast']['cpu_s'] == pytest.approx(1.025)  # median(.9, 1.1, 3, 3) = 2.05
    assert rows['fast']['wall_x'] == pytest.approx(0.625)
    assert rows['fast']['cpu_x'] == pytest.approx(1.025 / 0.95)
    assert rows['ours']['wall_x'] == rows['ours']['cpu_x'] == 1.0
    # Per round: round 0 1.25 / 2.5, round 1 1.0 / 1.5 (wall); 1.0 / 2.0, 3.0 / 1.5 (CPU).
    assert rows['fast']['round_wall_x'] == pytest.approx([0.5, 2 / 3])
    assert rows['fast']['round_cpu_x'] == pytest.approx([0.5, 2.0])
    assert rows['ours']['round_cpu_x'] == [1.0, 1.0]
    with pytest.raises(KeyError, match='baseline'):
        inference.summarise({'fast': calls['fast']}, batch=1)
    text = inference.report(rows, {'ours': 10 ** 6, 'fast': 2 * 10 ** 6}, 'HEADER')
    assert text.startswith('HEADER\n| variant')
    assert '625 ms (0.625x)' in text and '0.583 (0.500-0.667)' in text


def test_targets_verdicts():
    rows = {'ours': dict(wall_x=1.0, cpu_x=1.0), 'lora_merged': dict(wall_x=1.01, cpu_x=1.03),
            'hf': dict(wall_x=1.25, cpu_x=0.8, round_cpu_x=[1.02, 1.04, 1.01])}
    merged, hf = inference.targets(rows)
    assert '1.010 wall, 1.030 CPU -> wall met, cpu NOT met' in merged
    assert 'ours / hf = 0.800 wall, 1.250 cpu, 0.980 per-round CPU' in hf
    assert 'wall met, cpu NOT met, per-round CPU NOT met' in hf  # 0.980 > 0.97
    rows['hf']['round_cpu_x'] = [1.04, 1.05, 1.03]
    assert 'per-round CPU met' in inference.targets(rows)[1]  # 1 / 1.04 = 0.962
    assert inference.targets({'ours': rows['ours']}) == []


def test_parse_args_defaults_and_errors():
    args = inference.parse_args([])
    assert (args.size, args.repeats, args.steps, args.threads) == (640, 5, 3, 1)
    quick = inference.parse_args(['--quick', '--steps', '4'])
    assert (quick.size, quick.repeats, quick.steps) == (320, 3, 4)
    with pytest.raises(SystemExit):
        inference.parse_args(['--size', '100'])
    with pytest.raises(SystemExit):
        inference.parse_args(['--repeats', '0'])


def test_main_smoke_and_json(tmp_path, capsys):
    out = tmp_path / 'inference.json'
    rc = inference.main(['--size', '32', '--repeats', '2', '--steps', '1', '--warmup', '0',
                         '--out', str(out)], model_cfg=TINY, lora_config=LORA)
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'transformers EomtForUniversalSegmentation' in printed and 'ours vs hf' in printed
    result = json.loads(out.read_text())
    assert set(result['rows']) == set(inference.VARIANTS)
    assert all(len(c) == 2 for c in result['calls'].values())  # 2 rounds x 1 call
    assert result['rows']['ours']['wall_x'] == 1.0
    assert result['agreement']['ours vs hf']['mask'] < 1e-5


def test_main_times_only_the_chosen_variants_and_profiles(tmp_path, capsys):
    out = tmp_path / 'inference.json'
    rc = inference.main(['--size', '32', '--repeats', '1', '--steps', '1', '--warmup', '0',
                         '--variants', 'hf', '--profile', '5', '--out', str(out)],
                        model_cfg=TINY, lora_config=LORA)
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result['rows']) == {'ours', 'hf'}  # ours always: the baseline
    assert 'lora_merged vs lora' in printed  # all four are still checked
    assert 'profile: self CPU time per call' in printed and '| operator' in printed
    assert {'ours', 'hf'} == set(result['profile'])
    assert any(row['op'] == 'aten::addmm' for row in result['profile']['ours'])


def test_main_fails_loudly_on_disagreement(monkeypatch, capsys):
    real = inference.logits_fn

    def shifted(name, model):
        fn = real(name, model)
        if name != 'hf':
            return fn
        return lambda x: tuple(t + 0.01 for t in fn(x))

    monkeypatch.setattr(inference, 'logits_fn', shifted)
    rc = inference.main(['--size', '32', '--repeats', '1', '--steps', '1'], model_cfg=TINY,
                        lora_config=LORA)
    assert rc == 1
    err = capsys.readouterr().err
    assert 'error: output agreement failed' in err and 'ours vs hf' in err
