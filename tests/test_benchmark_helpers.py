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
