"""Inference speed in bf16, eager and ``torch.compile``, against transformers' EoMT.

The models come from ``tools/benchmark/inference.py``'s ``build_variants``: one seeded random
``transformers.EomtForUniversalSegmentation`` (``configs/eomt_lora_b640.py``'s network), saved
with ``save_pretrained``, converted by ``tools/convert_weights.py --format hf-eomt`` and loaded
into this project's EoMT, plus the same model with a live LoRA adapter merged. Their outputs are
compared in fp32 on the device with that script's agreement checks, then in bf16 (weights and
input cast to bfloat16) against each other and against fp32. The timed call is the same as that
script's (class and mask logits, ``torch.inference_mode``, eval mode), followed by a device
synchronisation so that wall-clock time covers the GPU's work.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, Mapping

import torch
from torch import Tensor

import inference as bench_inference

from .parts import Record, Settings

# fp32 on a GPU: convolutions may use TF32 (cuDNN's default), so the agreement tolerance relative
# to the largest logit is looser than inference.py's CPU default.
FP32_ATOL, FP32_RTOL = 1e-3, 1e-3
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); over 12 blocks and the upscaler the
# errors add up, so two bf16 runs of the same network, or bf16 against fp32, are compared at 3% of
# the largest |logit|.
BF16_RTOL = 3e-2
EAGER = ('ours', 'lora_merged', 'hf')
COMPILED = ('ours', 'hf')


def relative_difference(a: Tensor, ref: Tensor) -> float:
    """``max|a - ref| / max|ref|`` in float32 (inf when ``ref`` is all zeros)."""
    a, ref = a.float(), ref.float()
    scale = float(ref.abs().max())
    return float((a - ref).abs().max()) / scale if scale > 0 else float('inf')


def _synchronised(fn: Callable[[Tensor], tuple], device: str) -> Callable[[Tensor], tuple]:
    def run(x: Tensor) -> tuple:
        out = fn(x)
        if device == 'cuda':
            torch.cuda.synchronize()
        return out

    return run


def model_configs(settings: Settings):
    """``(model_cfg, lora_config)`` of the LoRA fine-tuning experiment at the run's size."""
    model_cfg, lora_config = bench_inference.default_model_configs(settings.size)
    if settings.backbone_arch is not None:
        model_cfg['backbone']['arch'] = copy.deepcopy(settings.backbone_arch)
    model_cfg['decoder'].update(copy.deepcopy(settings.decoder_overrides))
    return model_cfg, lora_config


def build_models(settings: Settings, shared: dict) -> dict:
    """fp32 and bf16 copies of the variants on the device (built once, then shared)."""
    if 'models' in shared:
        return shared['models']
    model_cfg, lora_config = model_configs(settings)
    variants = bench_inference.build_variants(model_cfg, lora_config, settings.size,
                                              settings.work_dir, seed=settings.seed)
    fp32 = {name: m.to(settings.device).eval() for name, m in variants.items()}
    bf16 = {name: copy.deepcopy(fp32[name]).to(torch.bfloat16) for name in EAGER}
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(settings.infer_batch, 3, settings.size, settings.size,
                    generator=gen).to(settings.device)
    shared['models'] = dict(fp32=fp32, bf16=bf16, x=x, x_bf16=x.to(torch.bfloat16))
    return shared['models']


def _outputs(models: Mapping[str, torch.nn.Module], x: Tensor) -> Dict[str, tuple]:
    with torch.inference_mode():
        return {name: bench_inference.logits_fn(name, m)(x) for name, m in models.items()}


def _time(fns: Mapping[str, Callable], x: Tensor, settings: Settings) -> Dict[str, dict]:
    calls = bench_inference.time_variants(fns, x, settings.infer_repeats, settings.infer_steps,
                                          warmup=2)
    rows = bench_inference.summarise(calls, settings.infer_batch)
    return {name: dict(ms_per_image=1e3 * r['wall_s'], images_per_s=1.0 / r['wall_s'],
                       x_ours=r['wall_x'], round_x_ours=r['round_wall_x'])
            for name, r in rows.items()}


def eager(settings: Settings, record: Record, shared: dict) -> None:
    """Outputs checked in fp32 and bf16, then bf16 eager images/s of ours, merged LoRA, hf."""
    models = build_models(settings, shared)
    out32 = _outputs(models['fp32'], models['x'])
    diffs = bench_inference.agreement(out32)
    record.metrics['fp32_agreement'] = diffs
    try:
        bench_inference.check_agreement(diffs, FP32_ATOL, FP32_RTOL)
        record.check('fp32: ours = transformers, merged LoRA = unmerged, LoRA live', True,
                     f"ours vs hf: class {diffs['ours vs hf']['class']:.2e}, mask "
                     f"{diffs['ours vs hf']['mask']:.2e}")
    except bench_inference.AgreementError as exc:
        record.check('fp32: ours = transformers, merged LoRA = unmerged, LoRA live', False,
                     str(exc))
    out16 = _outputs(models['bf16'], models['x_bf16'])
    shared['bf16_outputs'] = out16
    pairs = {'ours bf16 vs hf bf16': (out16['ours'], out16['hf']),
             'ours bf16 vs ours fp32': (out16['ours'], out32['ours']),
             'hf bf16 vs hf fp32': (out16['hf'], out32['hf'])}
    for pair, (a, b) in pairs.items():
        rel = [relative_difference(a[i], b[i]) for i in range(2)]
        record.metrics[pair] = dict(class_rel=rel[0], mask_rel=rel[1])
        record.check(f'{pair} within {BF16_RTOL:g} of the largest logit', max(rel) <= BF16_RTOL,
                     f'class {rel[0]:.2e}, mask {rel[1]:.2e}')
    fns = {name: _synchronised(bench_inference.logits_fn(name, models['bf16'][name]),
                               settings.device) for name in EAGER}
    rows = _time(fns, models['x_bf16'], settings)
    record.metrics['timing'] = rows
    record.check('bf16 eager timings finite', all(r['images_per_s'] > 0 for r in rows.values()),
                 ', '.join(f"{n} {r['images_per_s']:.1f} img/s" for n, r in rows.items()))
    shared['eager_timing'] = rows


def _outside_inference_mode(fn: Callable[[Tensor], tuple]) -> Callable[[Tensor], tuple]:
    """``fn`` under ``no_grad`` even when called inside ``torch.inference_mode`` (the timing)."""

    def run(x: Tensor) -> tuple:
        with torch.inference_mode(False), torch.no_grad():
            return fn(x)

    return run


def _first_call(fn: Callable[[Tensor], tuple], x: Tensor, device: str,
                inference_mode: bool) -> tuple:
    with torch.inference_mode() if inference_mode else torch.no_grad():
        out = fn(x)
        if device == 'cuda':
            torch.cuda.synchronize()
    return out


def compiled(settings: Settings, record: Record, shared: dict) -> None:
    """``torch.compile`` of ours and of transformers' model: compile time, graph breaks,
    outputs against eager bf16, images/s side by side with the eager calls.

    Each model is compiled and called under ``torch.inference_mode()``, as inference is timed;
    when that fails (a check fails and says why), it is compiled again and timed under
    ``torch.no_grad()`` so that the speed is still measured.
    """
    from torch._dynamo.utils import counters

    models = build_models(settings, shared)
    x = models['x_bf16']
    eager_out = shared.get('bf16_outputs') or _outputs(models['bf16'], x)
    fns: Dict[str, Callable] = {}
    record.metrics['backend'] = settings.compile_backend
    for name in COMPILED:
        eager_fn = bench_inference.logits_fn(name, models['bf16'][name])
        fns[name] = _synchronised(eager_fn, settings.device)
        breaks_before = sum(counters['graph_break'].values())
        fn = torch.compile(eager_fn, backend=settings.compile_backend)
        start = time.perf_counter()
        try:
            out = _first_call(fn, x, settings.device, inference_mode=True)
            record.check(f'{name}: torch.compile runs under torch.inference_mode', True)
        except Exception as exc:  # noqa: BLE001  (dynamo raises many types; reported)
            record.check(f'{name}: torch.compile runs under torch.inference_mode', False,
                         f'{type(exc).__name__}: {str(exc).splitlines()[0][:400]}')
            torch._dynamo.reset()
            fn = _outside_inference_mode(torch.compile(eager_fn,
                                                       backend=settings.compile_backend))
            start = time.perf_counter()
            out = _first_call(fn, x, settings.device, inference_mode=False)
            record.note(f'{name}: compiled and timed under torch.no_grad() instead')
        record.metrics[f'{name}_compile_s'] = time.perf_counter() - start
        breaks = sum(counters['graph_break'].values()) - breaks_before
        record.metrics[f'{name}_graph_breaks'] = breaks
        rel = [relative_difference(out[i], eager_out[name][i]) for i in range(2)]
        record.check(f'{name} compiled = eager bf16 within {BF16_RTOL:g}', max(rel) <= BF16_RTOL,
                     f'class {rel[0]:.2e}, mask {rel[1]:.2e}; {breaks} graph breaks; compile '
                     f"{record.metrics[f'{name}_compile_s']:.1f} s")
        fns[f'{name}_compiled'] = _synchronised(fn, settings.device)
    rows = _time(fns, x, settings)
    record.metrics['timing'] = rows
    record.check('compiled timings finite', all(r['images_per_s'] > 0 for r in rows.values()),
                 ', '.join(f"{n} {r['images_per_s']:.1f} img/s" for n, r in rows.items()))
    shared['compiled_timing'] = rows
