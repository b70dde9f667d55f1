"""Training steps of the three training configs under autocast: loss, memory, step time.

The models are the configs' own, built with ``MODELS.build`` from ``mmengine.Config`` (the
backbone's pretrained ``init_cfg`` removed: timings and memory do not depend on the weights), and
the optimizer is the config's ``optim_wrapper`` built by mmengine's ``build_optim_wrapper``, made
mixed-precision by :func:`eomt_mm.engine.amp.enable_amp` exactly as ``tools/train.py --amp`` does
(``AmpOptimWrapper``: autocast in ``optim_context``, ``GradScaler`` for fp16). The step is
mmengine's ``BaseModel.train_step`` written out (data preprocessor, loss, ``update_params``) so
that, on a CPU, where ``AmpOptimWrapper`` refuses to start, bf16 autocast can be added around the
forward pass instead; fp16 with a GradScaler is then not run. The config's schedule is not used:
the learning rate stays at the config's base value.

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` from before the model is moved to the
GPU (weights, gradients, optimizer state and activations); on a CPU the live bytes of every
tensor storage made from the model's build on (``memory_breakdown.LiveTensorTracker``), which is
what the allocator's counter would see.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import statistics
import time
import warnings
from typing import Dict, List

import torch

from bench_models import REPO, random_batch
from memory_breakdown import LiveTensorTracker

from .parts import NotApplicable, Record, Settings

TRAIN_CONFIGS: Dict[str, str] = {
    'lora': os.path.join(REPO, 'configs', 'eomt_lora_b640.py'),
    'full': os.path.join(REPO, 'configs', 'eomt_full_b640.py'),
    'lowmem': os.path.join(REPO, 'configs', 'eomt_lora_b640_lowmem.py'),
}
AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def load_config(variant: str, settings: Settings):
    """The variant's config with its model sized for the run and without pretrained weights.

    Args:
        variant: A key of :data:`TRAIN_CONFIGS`.
        settings: The run's settings (size, dry-run overrides).

    Returns:
        ``mmengine.Config`` whose ``model`` builds directly and whose ``optim_wrapper`` is the
        config's.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(TRAIN_CONFIGS[variant])
    model = cfg.model
    model.backbone.pop('init_cfg', None)
    model.backbone.img_size = settings.size
    model.data_preprocessor.size = (settings.size, settings.size)
    model.test_cfg = dict(mode='whole')
    if settings.backbone_arch is not None:
        model.backbone.arch = copy.deepcopy(settings.backbone_arch)
    model.decoder.update(copy.deepcopy(settings.decoder_overrides))
    if settings.lr is not None:
        cfg.optim_wrapper.optimizer.lr = settings.lr
    return cfg


def synthetic_data(settings: Settings, num_classes: int) -> dict:
    """One fixed batch as a dataloader gives it: uint8 images and labels in 32 px cells.

    Args:
        settings: Size, batch and seed.
        num_classes: Classes of the labels.

    Returns:
        ``dict(inputs=[uint8 [3, H, W]], data_samples=[SegDataSample])``.
    """
    _, samples = random_batch(settings.size, settings.batch, num_classes, seed=settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    images = torch.randint(0, 256, (settings.batch, 3, settings.size, settings.size),
                           generator=gen, dtype=torch.uint8)
    return dict(inputs=list(images), data_samples=samples)


def cpu_autocast_works(dtype: torch.dtype) -> bool:
    """Whether this CPU runs a matrix product under ``torch.autocast('cpu', dtype)``."""
    try:
        with torch.autocast('cpu', dtype=dtype):
            out = torch.ones(4, 4) @ torch.ones(4, 4)
        return out.dtype == dtype
    except (RuntimeError, TypeError):
        return False


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def _frozen_checksum(model: torch.nn.Module) -> torch.Tensor:
    frozen = [p.detach().double().sum() for p in model.parameters() if not p.requires_grad]
    return torch.stack(frozen) if frozen else torch.zeros(0, dtype=torch.float64)


def train_run(variant: str, precision: str, settings: Settings) -> dict:
    """``settings.steps`` training steps of one config in one precision.

    Args:
        variant: A key of :data:`TRAIN_CONFIGS`.
        precision: ``'fp16'`` or ``'bf16'``.
        settings: The run's settings.

    Returns:
        Losses per step, median step time, images per second, peak memory (bytes), trainable
        parameters, the LoRA and frozen-weight observations, the fp16 loss scale.

    Raises:
        NotApplicable: For fp16 on a CPU, or bf16 on a CPU without bf16 autocast.
    """
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import eomt_mm  # noqa: F401  registers the project's models and optimizer constructor
    from eomt_mm.engine.amp import enable_amp, fall_back_to_fp32_on_cpu

    device = settings.device
    dtype = AMP_DTYPES[precision]
    if device == 'cpu' and precision == 'fp16':
        raise NotApplicable('fp16 with a GradScaler is not run on a CPU: AmpOptimWrapper asserts '
                            'an accelerator (mmengine), and fp16 autocast is a GPU path; the GPU '
                            'run covers it')
    if device == 'cpu' and not cpu_autocast_works(dtype):
        raise NotApplicable(f'this CPU has no {precision} autocast')
    init_default_scope('mmseg')
    cfg = load_config(variant, settings)
    # tools/train.py's --amp: AmpOptimWrapper(dtype), and back to OptimWrapper without a GPU.
    enable_amp(cfg, precision)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fell_back = fall_back_to_fp32_on_cpu(cfg, cuda_available=device == 'cuda')
    # On the CPU the autocast that AmpOptimWrapper would open is opened here instead.
    extra_autocast = (lambda: torch.autocast('cpu', dtype=dtype)) if fell_back else (
        contextlib.nullcontext)

    tracker = None
    if device == 'cuda':
        # The previous run's tensors must be gone before the peak counter is reset (on the CPU
        # the tracker counts only storages made from here on, and a collection takes seconds).
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    else:
        tracker = LiveTensorTracker()
        tracker.__enter__()
    try:
        torch.manual_seed(settings.seed)
        model = MODELS.build(cfg.model).to(device).train()
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        data = synthetic_data(settings, model.decoder.num_classes)
        frozen_before = _frozen_checksum(model)
        losses: List[float] = []
        times: List[float] = []
        for step in range(settings.steps):
            _sync(device)
            start = time.perf_counter()
            with optim_wrapper.optim_context(model), extra_autocast():
                batch = model.data_preprocessor(data, True)
                loss_dict = model._run_forward(batch, mode='loss')
            loss, _ = model.parse_losses(loss_dict)
            optim_wrapper.update_params(loss)
            _sync(device)
            if step >= settings.warmup:
                times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
        if device == 'cuda':
            peak = torch.cuda.max_memory_allocated() - base_bytes
        else:
            peak = tracker.peak
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    lora_b = [p for n, p in model.named_parameters() if n.endswith('lora_B')]
    result = dict(
        variant=variant, precision=precision, losses=losses, step_s=statistics.median(times),
        images_per_s=settings.batch / statistics.median(times), peak_bytes=int(peak),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        params=sum(p.numel() for p in model.parameters()),
        optim_wrapper=type(optim_wrapper).__name__, lora_layers=len(lora_b),
        lora_b_max=max((float(p.detach().abs().max()) for p in lora_b), default=None),
        frozen_unchanged=bool(torch.equal(frozen_before, _frozen_checksum(model))),
        autocast=f'{device} {dtype}'.replace('torch.', ''))
    scaler = getattr(optim_wrapper, 'loss_scaler', None)
    if scaler is not None and precision == 'fp16':
        result['loss_scale'] = float(scaler.get_scale())
    del model, optim_wrapper
    if device == 'cuda':
        gc.collect()
        torch.cuda.empty_cache()
    return result


def loss_decreases(losses: List[float]) -> tuple:
    """``(ok, detail)``: the mean of the last quarter (at least 2 steps) is below the first's."""
    k = max(2, len(losses) // 4)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    return last < first, f'mean of the first {k} steps {first:.4f} -> last {k} {last:.4f}'


def check_train_run(result: dict, record: Record) -> None:
    """The checks of one training run (finite, decreasing loss; LoRA trains, the base not)."""
    losses = result['losses']
    record.check('loss finite at every step', all(math.isfinite(v) for v in losses),
                 f'{len(losses)} steps, first {losses[0]:.4f}, last {losses[-1]:.4f}')
    ok, detail = loss_decreases(losses)
    record.check(f'loss decreases over {len(losses)} steps', ok, detail)
    record.check('peak memory measured', result['peak_bytes'] > 0,
                 f"{result['peak_bytes'] / 2**20:.1f} MiB")
    if result['lora_layers']:
        record.check('LoRA matrices trained (lora_B left zero)', (result['lora_b_max'] or 0) > 0,
                     f"max |lora_B| {result['lora_b_max']:.3g} over {result['lora_layers']} "
                     'layers')
        record.check('frozen base weights unchanged', result['frozen_unchanged'])


def make_train_part(variant: str, precision: str):
    """The part function of one (config, precision) run."""

    def part(settings: Settings, record: Record, shared: dict) -> None:
        result = train_run(variant, precision, settings)
        shared.setdefault('train', {})[(variant, precision)] = result
        record.metrics.update({k: v for k, v in result.items() if k != 'losses'})
        record.metrics['losses'] = [round(v, 5) for v in result['losses']]
        check_train_run(result, record)
        if 'loss_scale' in result:
            record.note(f"fp16 GradScaler scale after {settings.steps} steps: "
                        f"{result['loss_scale']:g}")

    return part


def memory_ratios(settings: Settings, record: Record, shared: dict) -> None:
    """Peak memory of LoRA and of the low-memory config as ratios to full fine-tuning."""
    runs = shared.get('train', {})
    precisions = sorted({p for _, p in runs})
    if not precisions:
        raise RuntimeError('no training run finished: nothing to compare')
    for precision in precisions:
        full = runs.get(('full', precision))
        if full is None:
            record.note(f'{precision}: no full fine-tuning run to compare with')
            continue
        ratios = {}
        for variant in ('lora', 'lowmem'):
            if (variant, precision) in runs:
                ratios[variant] = runs[(variant, precision)]['peak_bytes'] / full['peak_bytes']
                ratios[f'{variant}_step'] = (runs[(variant, precision)]['step_s']
                                             / full['step_s'])
        record.metrics[precision] = ratios
        if 'lora' in ratios:
            record.check(f'{precision}: LoRA peak memory below full fine-tuning',
                         ratios['lora'] < 1.0, f"{ratios['lora']:.3f}x full")
        if 'lora' in ratios and 'lowmem' in ratios:
            record.check(f'{precision}: low-memory config below LoRA',
                         ratios['lowmem'] < ratios['lora'],
                         f"{ratios['lowmem']:.3f}x full vs LoRA {ratios['lora']:.3f}x")
    if not record.checks:
        raise RuntimeError('memory ratios need the full fine-tuning run and at least one other '
                           'run in the same precision')
