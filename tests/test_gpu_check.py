"""tools/benchmark/gpu_check.py: the CPU dry run end to end, and the part runner's verdicts.

The dry run exercises every part of the GPU check on a tiny EoMT (4 blocks of width 64, 64 px),
so that the script the GPU machine runs in its one call cannot rot between calls.
"""
import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip('transformers')

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools',
                      'benchmark')
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
import gpu_check  # noqa: E402
from gpu import parts, training  # noqa: E402

TRAIN_VARIANTS = ('lora', 'full', 'lowmem')


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_check')
    start = time.perf_counter()
    status = gpu_check.main(['--dry-run', '--out', str(out), '--budget', '900'])
    seconds = time.perf_counter() - start
    with open(out / 'gpu_check.json') as f:
        report = json.load(f)
    return status, {p['name']: p for p in report['parts']}, report, out, seconds


@pytest.mark.slow
def test_dry_run_passes_every_part(dry_run):
    status, by_name, _, _, _ = dry_run
    assert list(by_name) == gpu_check.PART_NAMES
    problems = {name: (p['status'], p['error'], [c for c in p['checks'] if not c['ok']])
                for name, p in by_name.items() if p['status'] not in ('passed', 'not_applicable')}
    assert not problems
    assert status == 0


@pytest.mark.slow
def test_dry_run_training_runs(dry_run):
    _, by_name, report, _, _ = dry_run
    assert report['settings']['device'] == 'cpu' and report['settings']['dry_run']
    for variant in TRAIN_VARIANTS:
        bf16 = by_name[f'train_{variant}_bf16']
        assert bf16['status'] == 'passed'
        metrics = bf16['metrics']
        assert metrics['autocast'] == 'cpu bfloat16'
        assert metrics['optim_wrapper'] == 'OptimWrapper'  # AmpOptimWrapper needs a GPU
        assert len(metrics['losses']) == report['settings']['steps']
        assert metrics['peak_bytes'] > 0 and metrics['step_s'] > 0
        fp16 = by_name[f'train_{variant}_fp16']
        assert fp16['status'] == 'not_applicable' and 'GradScaler' in fp16['notes'][0]
    lora, full = by_name['train_lora_bf16']['metrics'], by_name['train_full_bf16']['metrics']
    assert lora['lora_layers'] == 16 and full['lora_layers'] == 0  # 4 blocks x qkv/proj/fc1/fc2
    assert lora['trainable'] < full['trainable'] == full['params']
    names = {c['name'] for c in by_name['train_lora_bf16']['checks']}
    assert {'frozen base weights unchanged', 'LoRA matrices trained (lora_B left zero)'} <= names
    ratios = by_name['train_memory']['metrics']['bf16']
    assert 0 < ratios['lowmem'] < ratios['lora'] < 1


@pytest.mark.slow
def test_dry_run_inference_attention_and_train_tool(dry_run):
    _, by_name, _, out, _ = dry_run
    eager = by_name['inference_eager']['metrics']
    assert eager['fp32_agreement']['ours vs hf']['class'] < 1e-4
    assert set(eager['timing']) == {'ours', 'lora_merged', 'hf'}
    compiled = by_name['inference_compile']['metrics']
    assert compiled['backend'] == 'eager'
    assert set(compiled['timing']) == {'ours', 'hf', 'ours_compiled', 'hf_compiled'}
    sdpa = by_name['sdpa_kernel']['metrics']['ours']['backends']
    assert sdpa.get('flash') == 4 and not sdpa.get('math')  # CPU flash kernel, 4 blocks
    tool = by_name['train_tool_amp']
    assert [c['ok'] for c in tool['checks']] == [True] * 4
    assert len(tool['metrics']['fp16_losses']) == 6
    text = (out / 'gpu_check.md').read_text()
    assert '| train_lora_bf16 ' in text and 'Training steps' in text and 'Inference, bf16' in text


def _record_fn(checks=(), error=None, sleep=0.0, not_applicable=None):
    def fn(settings, record, shared):
        time.sleep(sleep)
        if not_applicable:
            raise parts.NotApplicable(not_applicable)
        for ok in checks:
            record.check('c', ok)
        if error:
            raise ValueError(error)
    return fn


def _settings():
    args = gpu_check.parse_args(['--dry-run'])
    return gpu_check.make_settings(args, '/nonexistent')


def test_part_runner_statuses_and_exit_code():
    settings = _settings()
    plan = [parts.Part('ok', _record_fn([True, True]), 0, 0, ''),
            parts.Part('raises', _record_fn([True], error='boom'), 0, 0, ''),
            parts.Part('check_fails', _record_fn([True, False]), 0, 0, ''),
            parts.Part('no_check', _record_fn(), 0, 0, ''),
            parts.Part('cpu', _record_fn(not_applicable='needs a GPU'), 0, 0, ''),
            parts.Part('too_big', _record_fn([True]), 1e6, 1e6, '')]
    records = parts.run_parts(plan, settings, budget_s=100)
    assert [r.status for r in records] == ['passed', 'error', 'failed', 'failed',
                                           'not_applicable', 'skipped']
    assert 'ValueError: boom' in records[1].error
    assert records[4].notes == ['needs a GPU']
    assert parts.exit_code(records) == 1
    assert parts.exit_code([records[0], records[4]]) == 0
    assert parts.exit_code([records[0], records[5]]) == 2


def test_part_is_interrupted_when_the_budget_is_spent():
    plan = [parts.Part('slow', _record_fn([True], sleep=5.0), 0, 0, ''),
            parts.Part('after', _record_fn([True]), 0, 0, '')]
    start = time.perf_counter()
    records = parts.run_parts(plan, _settings(), budget_s=0.3)
    assert time.perf_counter() - start < 3.0
    assert records[0].status == 'timeout' and 'budget spent' in records[0].error
    assert records[1].status == 'skipped'  # nothing left for the next part


def test_loss_decrease_compares_first_and_last_quarter():
    assert training.loss_decreases([5, 5, 4, 4, 3, 3, 2, 2])[0]
    assert not training.loss_decreases([2, 2, 3, 3, 4, 4, 5, 5])[0]
    # A late spike that keeps the last quarter's mean above the first's fails.
    assert not training.loss_decreases([3, 3, 2, 1, 1, 1, 1, 6])[0]


def test_memory_ratios_fail_when_the_low_memory_config_is_not_lower():
    def run(peak):
        return dict(peak_bytes=peak, step_s=1.0)

    record = parts.Record('train_memory')
    shared = {'train': {('full', 'bf16'): run(100), ('lora', 'bf16'): run(90),
                        ('lowmem', 'bf16'): run(95)}}
    training.memory_ratios(_settings(), record, shared)
    assert record.metrics['bf16']['lora'] == pytest.approx(0.9)
    assert [c['ok'] for c in record.checks] == [True, False]
    with pytest.raises(RuntimeError, match='no training run'):
        training.memory_ratios(_settings(), parts.Record('x'), {})


def test_gpu_run_refuses_without_a_gpu(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip('a GPU is visible')
    assert gpu_check.main(['--out', '/nonexistent']) == 2
    assert '--dry-run' in capsys.readouterr().err


def test_shell_wrapper_parses():
    script = os.path.join(_BENCH, 'gpu_check.sh')
    assert subprocess.run(['bash', '-n', script]).returncode == 0
