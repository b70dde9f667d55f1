"""The arithmetic behind the published benchmark figures (tools/benchmark/bench_stats.py)."""
import importlib.util
import os

import pytest
import torch
from torch import nn

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools',
                     'benchmark', 'bench_stats.py')
_spec = importlib.util.spec_from_file_location('bench_stats', _PATH)
bench_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_stats)


def test_median_odd_even_and_errors():
    assert bench_stats.median([3.0, 1.0, 2.0]) == 2.0
    assert bench_stats.median([4, 1, 3, 2]) == 2.5
    assert bench_stats.median(x for x in [7]) == 7.0
    with pytest.raises(ValueError, match='empty'):
        bench_stats.median([])
    with pytest.raises(ValueError, match='non-finite'):
        bench_stats.median([1.0, float('nan')])


def test_ratios_to_baseline():
    rows = {'full': dict(t=2.0, mem=400.0), 'lora': dict(t=1.0, mem=300.0),
            'heads': dict(t=0.5, mem=100.0)}
    r = bench_stats.ratios_to(rows, 'full', ['t', 'mem'])
    assert r['full'] == dict(t=1.0, mem=1.0)
    assert r['lora'] == dict(t=0.5, mem=0.75)
    assert r['heads'] == dict(t=0.25, mem=0.25)
    with pytest.raises(KeyError, match='baseline'):
        bench_stats.ratios_to(rows, 'missing', ['t'])
    with pytest.raises(ZeroDivisionError):
        bench_stats.ratio(1.0, 0.0)


def test_optimizer_state_bytes_counts_adamw_state_of_trainable_params_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert bench_stats.optimizer_state_bytes(opt) == 0
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    trainable = 7 * 3 + 3
    # exp_avg + exp_avg_sq (float32) per element, plus one float32 step counter per tensor.
    assert bench_stats.optimizer_state_bytes(opt) == 2 * 4 * trainable + 2 * 4
    # float64 parameters double the moment bytes.
    model64 = nn.Linear(4, 2).double()
    opt64 = torch.optim.AdamW(model64.parameters())
    model64(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    opt64.step()
    expected = sum(2 * 8 * p.numel() + opt64.state[p]['step'].element_size()
                   for p in model64.parameters())
    assert bench_stats.optimizer_state_bytes(opt64) == expected


def test_rss_and_formatting():
    before = bench_stats.peak_rss_bytes()
    now = bench_stats.current_rss_bytes()
    # The kernel updates the high-water mark lazily (a page or so behind VmRSS).
    assert before > 0 and (now is None or 0 < now <= before + 2**20)
    block = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
    after = bench_stats.peak_rss_bytes()
    assert after >= before and after >= (now or 0) + 250 * 2**20
    del block
    assert bench_stats.human_bytes(512) == '512 B'
    assert bench_stats.human_bytes(1536) == '1.5 KiB'
    assert bench_stats.human_bytes(3 * 1024**3) == '3.0 GiB'
    table = bench_stats.format_table(['a', 'bb'], [[1, 'x'], ['long', 2]])
    assert table.splitlines() == ['| a    | bb |', '|------|----|', '| 1    | x  |',
                                  '| long | 2  |']
    with pytest.raises(ValueError, match='one cell per header'):
        bench_stats.format_table(['a'], [[1, 2]])


def _benchmark_script(name):
    """Import ``tools/benchmark/<name>.py`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(_PATH), f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_models():
    return _benchmark_script('bench_models')


def test_benchmark_variants_train_what_their_names_say():
    """Each training-step variant builds the model it claims (a narrow 12-block ViT)."""
    bench_models = _bench_models()
    arch = dict(embed_dims=32, num_layers=12, num_heads=2, feedforward_channels=64)
    trainable = {}
    for name in bench_models.VARIANTS:
        model = bench_models.build_eomt_b(32, name, backbone_arch=arch)
        assert model.training
        trainable[name] = {n for n, p in model.named_parameters() if p.requires_grad}
        lora = {n for n in trainable[name] if 'lora_' in n}
        backbone = {n for n in trainable[name] if n.startswith('backbone.')} - lora
        decoder = {n for n in trainable[name] if n.startswith('decoder.')}
        ckpt = (model.checkpoint_blocks, model.checkpoint_decoder)
        if name == 'full':
            assert trainable[name] == {n for n, _ in model.named_parameters()} and not lora
        elif name == 'heads':
            assert not lora and not backbone and 'decoder.q.weight' in decoder
        elif name == 'lora_task':
            # A task adapter: LoRA and norms only, the trained decoder is frozen too.
            assert lora and all(('.ln' in n or 'norm' in n) for n in backbone | decoder)
            assert 'decoder.q.weight' not in decoder and decoder
        else:
            assert lora and all(('.ln' in n or 'norm' in n) for n in backbone)
            assert 'decoder.class_head.weight' in decoder
        assert ckpt == {'lora_ckpt': (9, False), 'lora_ckdec': (0, True),
                        'lora_ckpt_ckdec': (9, True), 'lora_ckall': (12, True)}.get(
                            name, (0, False)), name
    assert trainable['lora_p0'] == trainable['lora']


def test_run_all_suite_runs_existing_scripts_with_known_variants():
    run_all = _benchmark_script('run_all')
    variants = set(_bench_models().VARIANTS)
    for quick in (True, False):
        suite = run_all.suite(quick, out='results')
        scripts = [cmd[0] for _, cmd in suite]
        assert {'train_step.py', 'memory_breakdown.py', 'inference.py', 'adapter_swap.py',
                'lora_layer.py', 'anomaly_metric.py'} <= set(scripts)
        for _, cmd in suite:
            assert os.path.isfile(os.path.join(os.path.dirname(_PATH), cmd[0])), cmd
            if '--variants' in cmd:
                start = cmd.index('--variants') + 1
                names = []
                for token in cmd[start:]:
                    if token.startswith('--'):
                        break
                    names.append(token)
                assert names and set(names) <= variants, names


def _memory_breakdown():
    return _benchmark_script('memory_breakdown')


def test_live_tensor_tracker_counts_peak_frees_and_ignores_existing_storages():
    tracker_cls = _memory_breakdown().LiveTensorTracker
    weight = torch.ones(4000)
    with tracker_cls(ignore=[weight]) as tracker:
        a = torch.ones(1000)          # 4,000 B
        b = torch.zeros(2000)         # 8,000 B
        view = weight[:10].t()        # a view of an existing storage: not new memory
        del a
        c = torch.full((500,), 2.0)   # 2,000 B
        assert tracker.current == 10_000
    assert tracker.peak == 12_000
    assert sorted(tracker.at_peak) == [(('ones', (1000,)), 4000), (('zeros', (2000,)), 8000)]
    assert tracker.largest_at_peak(1) == [(('zeros', (2000,)), 1, 8000)]
    del b, c, view


def test_memory_breakdown_sees_what_decoder_checkpointing_removes():
    breakdown = _memory_breakdown()
    arch = dict(embed_dims=32, num_layers=12, num_heads=2, feedforward_channels=64)
    plain = breakdown.measure(64, 'lora', backbone_arch=arch, top=50)
    ckdec = breakdown.measure(64, 'lora_ckdec', backbone_arch=arch, top=50)
    assert 0 < plain['after_backward'] < plain['after_forward'] <= plain['peak']
    assert ckdec['after_forward'] < plain['after_forward']

    def upscaler_maps(result):  # full-width maps at 1/4 resolution (16 x 16 for 64 px)
        return sum(size for (op, shape), _, size in result['largest']
                   if len(shape) == 4 and shape[1:] == (32, 16, 16))

    assert upscaler_maps(plain) > 0
    assert upscaler_maps(ckdec) < upscaler_maps(plain)
