#!/usr/bin/env python
"""Inference of EoMT-B: this project (no LoRA, LoRA, merged LoRA) vs Hugging Face transformers.

Four variants compute the same network, the model of ``configs/eomt_lora_b640.py``
(DINOv2-reg4 ViT-B/16, 19 classes, 100 queries in the last 3 blocks) at ``--size`` px:

* ``ours``: this project's ``EoMT`` without LoRA;
* ``lora``: the same model built with the config's ``lora_config`` (rank 8 on qkv / proj /
  fc1 / fc2), the same base weights, and seeded random ``lora_B`` so that the adapter really
  changes the outputs (a fresh adapter, ``lora_B = 0``, would be a no-op that hides bugs);
* ``lora_merged``: ``lora`` after :func:`eomt_mm.lora.merge_lora` (plain ``nn.Linear`` layers
  holding ``W0 + scaling * B A``);
* ``hf``: ``transformers.EomtForUniversalSegmentation`` with the same configuration.

``--backbone dinov3`` runs the same comparison for EoMT-B/16 on DINOv3, the model of
``configs/eomt/eomt-lora-r8_dinov3-b_1xb16-20k_cityscapes-640x640.py``, against
``transformers.EomtDinov3ForUniversalSegmentation``, the weights converted with
``--format hf-eomt-dinov3``.

The weights come from one seeded random Hugging Face model (its own initialisation, plus
random values for the tensors it initialises to constants, so that a swapped or dropped tensor
cannot hide), saved with ``save_pretrained`` and converted into this project's format by
``tools/convert_weights.py --format hf-eomt`` run as a subprocess, exactly as a user would. Its
``attn_mask_probs`` are zero, the state of a trained model whose masked attention has been
annealed away, so that both implementations run plain attention at inference.

What is timed: one call producing the per-query class logits ``[B, Q, K + 1]`` and mask logits
``[B, Q, H/4, W/4]``, under ``torch.inference_mode()`` in eval mode. For this project it is the
mmseg tensor mode, ``model(x, mode='tensor')`` (``EoMT._forward``: backbone, queries, heads,
without the per-pixel class scores, the upsampling and the ``SegDataSample`` packing of
``predict``); for transformers it is ``model(pixel_values=x)``, whose output holds the same two
tensors. Both thus do the same work, and the comparison leaves post-processing out.

Before timing, the outputs are checked in the same run (exit status 1 with a message when a
check fails): ``ours`` equals ``hf`` and ``lora_merged`` equals ``lora`` within
``atol + rtol * max|reference|`` (class and mask logits, maximum absolute differences printed),
and ``lora`` differs from ``ours`` by more than 10 times that tolerance (the adapter is live, so
the merge check means something).

Timing: the variants alternate in rotated order over ``--repeats`` rounds, each round making
``--steps`` timed calls per variant after ``--warmup`` untimed calls per variant at the start.
All variants live in one process, so they see the same machine state side by side; peak memory
is therefore not reported per variant (a process's peak RSS would mix them). Reported: medians
per image of the wall-clock time and of the process CPU time (``time.process_time``, all
threads), their ratios to ``ours`` from the medians, and the median (min-max) over rounds of the
per-round ratio, which is robust to load that drifts during the run. With ``--threads 1``
(default) the CPU time is the compute itself, little affected by other processes on a shared
machine; compare ratios, not absolute times.

    python tools/benchmark/inference.py                                  # 640, batch 1
    python tools/benchmark/inference.py --repeats 5 --steps 3 --out inference_640.json
    python tools/benchmark/inference.py --quick                          # 320 px, 3 x 2 calls
    python tools/benchmark/inference.py --backbone dinov3 --size 640     # EoMT-B on DINOv3
    python tools/benchmark/inference.py --profile 15                     # + where the time goes
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_models import REPO, eomt_b_config  # noqa: E402
from bench_stats import cpu_name, format_table, median, ratio, ratios_to  # noqa: E402
from op_profile import format_profile, op_profile  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

CONVERT_TOOL = os.path.join(REPO, 'tools', 'convert_weights.py')
BASELINE = 'ours'
VARIANTS: Dict[str, str] = {
    'ours': 'this project, no LoRA',
    'lora': 'this project, LoRA unmerged',
    'lora_merged': 'this project, LoRA merged (merge_lora)',
    'hf': 'transformers EomtForUniversalSegmentation',
}
# Pairs checked for agreement: (variant, reference) -> must agree / must differ.
MUST_AGREE = (('ours', 'hf'), ('lora_merged', 'lora'))
MUST_DIFFER = (('lora', 'ours'), )
# How many tolerances apart 'lora' and 'ours' must be: with a smaller effect the merge check
# could pass even if merging dropped the adapter.
LIVE_FACTOR = 10.0
# --backbone: the model config (the LoRA fine-tuning experiment), and per backbone type the
# transformers model class and the converter format of its weights.
BACKBONES = {
    'dinov2': os.path.join(REPO, 'configs', 'eomt_lora_b640.py'),
    'dinov3': os.path.join(REPO, 'configs', 'eomt',
                           'eomt-lora-r8_dinov3-b_1xb16-20k_cityscapes-640x640.py'),
}
HF_MODELS = {'DINOv2': ('EomtForUniversalSegmentation', 'hf-eomt'),
             'DINOv3': ('EomtDinov3ForUniversalSegmentation', 'hf-eomt-dinov3')}
QUICK = dict(size=320, repeats=3, steps=2)
FULL = dict(size=640, repeats=5, steps=3)

Logits = Tuple[Tensor, Tensor]


class AgreementError(RuntimeError):
    """Raised when variants that must compute the same function do not (or LoRA is a no-op)."""


# ------------------------------------------------------------------------------ models
def default_model_configs(size: int, backbone: str = 'dinov2') -> Tuple[dict, dict]:
    """``(model_cfg without LoRA, lora_config)`` of the ``--backbone``'s config at ``size``.

    Args:
        size: Input side (multiple of 16).
        backbone: A key of :data:`BACKBONES`.

    Returns:
        The model config (no pretrained initialisation, whole-image test mode) and its
        ``lora_config``.
    """
    if backbone == 'dinov2':
        with_lora = eomt_b_config(size, lora={})
    else:
        from mmengine.config import Config
        with_lora = Config.fromfile(BACKBONES[backbone]).model.to_dict()
        with_lora['backbone'].pop('init_cfg', None)
        with_lora['backbone']['img_size'] = size
        with_lora.pop('data_preprocessor', None)
        with_lora['test_cfg'] = dict(mode='whole')
    lora_config = with_lora.pop('lora_config')
    return with_lora, lora_config


def _hf_dinov3_config(backbone: nn.Module, decoder: nn.Module, image_size: int):
    """``transformers.EomtDinov3Config`` of an EoMT on this project's ``DINOv3``."""
    import transformers
    if backbone.ffn_type != 'origin':
        # transformers' EoMT-DINOv3 applies config.hidden_act in its gated MLP and in its heads
        # alike; this project (as the reference) uses SiLU in SwiGLU and GELU in the heads.
        raise ValueError(f'hf_config_for: only the GELU-MLP DINOv3 backbone is supported, got '
                         f'ffn_type={backbone.ffn_type!r}')
    return transformers.EomtDinov3Config(
        hidden_size=backbone.embed_dims, num_hidden_layers=backbone.num_layers,
        num_attention_heads=backbone.num_heads,
        intermediate_size=backbone.arch_settings['feedforward_channels'], hidden_act='gelu',
        layer_norm_eps=backbone.layers[0].ln1.eps, image_size=image_size,
        patch_size=backbone.patch_size, num_channels=3,
        num_register_tokens=backbone.num_register_tokens, use_gated_mlp=False,
        num_upscale_blocks=len(decoder.upscale), num_blocks=decoder.num_blocks,
        num_queries=decoder.num_queries, num_labels=decoder.num_classes,
        hidden_dropout_prob=0.0, attention_dropout=0.0, drop_path_rate=0.0,
        rope_parameters=dict(rope_type='default', rope_theta=backbone.rope_base))


def hf_config_for(model: nn.Module, image_size: int):
    """The ``transformers.EomtConfig`` describing the same network as one of our EoMT models.

    Args:
        model: This project's ``EoMT`` with a ``DINOv2`` or ``DINOv3`` backbone (GELU MLP).
        image_size: Input side; the transformers port only runs at its configured size.

    Returns:
        ``transformers.EomtConfig`` (``EomtDinov3Config`` for DINOv3; dropouts and drop-path
        off).

    Raises:
        ValueError: For a network the transformers port cannot express here (SwiGLU MLP, an
            MLP width that is not a whole multiple of the embedding width, a size that is not a
            multiple of the patch size).
    """
    import transformers
    backbone, decoder = model.backbone, model.decoder
    if image_size % backbone.patch_size:
        raise ValueError(f'hf_config_for: image_size={image_size} is not a multiple of the '
                         f'patch size {backbone.patch_size}')
    if type(backbone).__name__ == 'DINOv3':
        return _hf_dinov3_config(backbone, decoder, image_size)
    if getattr(backbone, 'ffn_type', 'origin') != 'origin':
        raise ValueError(f'hf_config_for: only the GELU-MLP backbone is supported, got '
                         f'ffn_type={backbone.ffn_type!r}')
    dims = backbone.embed_dims
    ffn = backbone.arch_settings['feedforward_channels']
    if ffn % dims:
        raise ValueError(f'hf_config_for: feedforward_channels={ffn} is not a multiple of '
                         f'embed_dims={dims}; transformers takes an integer mlp_ratio here')
    if image_size % backbone.patch_size:
        raise ValueError(f'hf_config_for: image_size={image_size} is not a multiple of the '
                         f'patch size {backbone.patch_size}')
    return transformers.EomtConfig(
        hidden_size=dims, num_hidden_layers=backbone.num_layers,
        num_attention_heads=backbone.num_heads, mlp_ratio=ffn // dims, hidden_act='gelu',
        layer_norm_eps=backbone.layers[0].ln1.eps, image_size=image_size,
        patch_size=backbone.patch_size, num_channels=3,
        num_register_tokens=backbone.num_register_tokens,
        num_upscale_blocks=len(decoder.upscale), num_blocks=decoder.num_blocks,
        num_queries=decoder.num_queries, num_labels=decoder.num_classes, use_swiglu_ffn=False,
        hidden_dropout_prob=0.0, attention_dropout=0.0, drop_path_rate=0.0)


def random_hf_eomt(config, seed: int) -> nn.Module:
    """A seeded random transformers EoMT in eval mode, masked attention off.

    Args:
        config: ``transformers.EomtConfig`` (-> ``EomtForUniversalSegmentation``) or
            ``EomtDinov3Config`` (-> ``EomtDinov3ForUniversalSegmentation``).
        seed: Seed of the initialisation.

    Returns:
        The model. Tensors that transformers initialises to constants (register tokens,
        layer scales, LayerNorm affines) get random values near them: with constants, a
        converter that swapped two of them would still produce equal outputs.
    """
    import transformers
    torch.manual_seed(seed)
    model = (transformers.EomtDinov3ForUniversalSegmentation(config)
             if isinstance(config, transformers.EomtDinov3Config)
             else transformers.EomtForUniversalSegmentation(config))
    gen = torch.Generator().manual_seed(seed + 1)

    def rand(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('register_tokens'):
                p.copy_(0.02 * rand(p))
            elif name.endswith('lambda1'):
                p.copy_(1.0 + 0.25 * rand(p))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1.0 + 0.1 * rand(m.weight))
                m.bias.copy_(0.1 * rand(m.bias))
        # A trained model's state: the mask-annealing schedule has switched masking off.
        model.attn_mask_probs.zero_()
    return model.eval()


def convert_with_tool(hf_model: nn.Module, work_dir: str, fmt: str = 'hf-eomt') -> str:
    """Save ``hf_model`` as transformers does and convert it with ``tools/convert_weights.py``.

    Args:
        hf_model: An ``EomtForUniversalSegmentation`` (or ``EomtDinov3...`` with ``fmt``
            ``'hf-eomt-dinov3'``).
        work_dir: Existing folder for the saved model and the converted checkpoint.
        fmt: The converter's ``--format``.

    Returns:
        Path of the converted checkpoint (``{'state_dict', 'meta'}``).

    Raises:
        RuntimeError: When the conversion tool fails (its stderr is included).
    """
    from transformers.utils import logging as hf_logging
    src_dir = os.path.join(work_dir, 'hf_eomt')
    # save_pretrained draws a progress bar on stderr; it would clutter the benchmark's output.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf_model.save_pretrained(src_dir)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    src = os.path.join(src_dir, 'model.safetensors')
    if not os.path.isfile(src):
        raise RuntimeError(f'save_pretrained wrote no single model.safetensors in {src_dir}: '
                           f'{sorted(os.listdir(src_dir))}')
    dst = os.path.join(work_dir, 'eomt_mm_from_hf.pth')
    # The CLI, in a subprocess with this interpreter: what the README tells users to run.
    proc = subprocess.run([sys.executable, CONVERT_TOOL, src, dst, '--format', fmt],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f'tools/convert_weights.py failed (exit {proc.returncode}):\n'
                           f'{proc.stderr[-4000:]}')
    return dst


def randomize_lora_b_(model: nn.Module, seed: int, std: float) -> int:
    """Give every ``lora_B`` seeded ``N(0, std^2)`` values, in place.

    Args:
        model: A LoRA-injected model.
        seed: Seed of the values.
        std: Their standard deviation.

    Returns:
        The number of LoRA layers changed.

    Raises:
        ValueError: If the model has no LoRA layer.
    """
    from eomt_mm.lora import LoRALinear
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(std * torch.randn(m.lora_B.shape, generator=gen,
                                                 dtype=m.lora_B.dtype))
                count += 1
    if not count:
        raise ValueError('randomize_lora_b_: the model has no LoRALinear layer')
    return count


def build_variants(model_cfg: dict, lora_config: dict, size: int, work_dir: str,
                   seed: int = 0, lora_b_std: float = 0.02) -> Dict[str, nn.Module]:
    """Build the four variants with the same weights, all in eval mode.

    Args:
        model_cfg: mmseg config of our ``EoMT`` without LoRA (its ``lora_config`` is dropped if
            present; the backbone's ``img_size`` should be ``size``).
        lora_config: The LoRA config block of the ``lora`` variant.
        size: Input side (the transformers model's ``image_size``).
        work_dir: Existing folder for the saved and converted weights.
        seed: Seed of the weights and of the adapter.
        lora_b_std: Standard deviation of the random ``lora_B``.

    Returns:
        ``{'ours', 'lora', 'lora_merged', 'hf'}`` -> model.

    Raises:
        RuntimeError: If the converted checkpoint does not fill the LoRA model's base exactly.
    """
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    import eomt_mm  # noqa: F401  registers the project's models
    from eomt_mm.lora import merge_lora
    from mmseg.registry import MODELS

    cfg = copy.deepcopy(model_cfg)
    cfg.pop('lora_config', None)
    ours = MODELS.build(cfg)
    hf = random_hf_eomt(hf_config_for(ours, size), seed)
    path = convert_with_tool(hf, work_dir, HF_MODELS[type(ours.backbone).__name__][1])
    state = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    ours.load_state_dict(state, strict=True)

    torch.manual_seed(seed)  # lora_A's initialisation
    lora = MODELS.build(dict(copy.deepcopy(cfg), lora_config=copy.deepcopy(lora_config)))
    loaded = lora.load_state_dict(state, strict=False)
    not_lora = [k for k in loaded.missing_keys if not k.rsplit('.', 1)[-1].startswith('lora_')]
    if loaded.unexpected_keys or not_lora:
        raise RuntimeError(f'the converted weights do not fit the LoRA model: unexpected '
                           f'{loaded.unexpected_keys}, missing base keys {not_lora}')
    randomize_lora_b_(lora, seed, lora_b_std)
    merged = merge_lora(copy.deepcopy(lora))
    return dict(ours=ours.eval(), lora=lora.eval(), lora_merged=merged.eval(), hf=hf)


def logits_fn(name: str, model: nn.Module) -> Callable[[Tensor], Logits]:
    """The timed call of one variant: ``x -> (class_logits, mask_logits)`` (final prediction).

    Args:
        name: Variant name (``'hf'`` = the transformers model, else one of ours).
        model: The variant's model.

    Returns:
        The function.
    """
    if name == 'hf':
        def run(x: Tensor) -> Logits:
            out = model(pixel_values=x)
            return out.class_queries_logits, out.masks_queries_logits
    else:
        def run(x: Tensor) -> Logits:
            # mmseg tensor mode: per-layer lists, one entry in eval mode (no masked attention).
            masks, classes = model(x, mode='tensor')
            return classes[-1], masks[-1]
    return run


# --------------------------------------------------------------------------- agreement
def agreement(outputs: Mapping[str, Logits]) -> Dict[str, Dict[str, float]]:
    """Maximum absolute differences between the variants' class and mask logits.

    Args:
        outputs: Variant -> ``(class_logits, mask_logits)`` on the same input.

    Returns:
        ``'a vs b'`` -> ``{'class', 'mask'}`` (max ``|a - b|``) and ``{'class_scale',
        'mask_scale'}`` (max ``|b|``, the reference's magnitude), for every pair of
        :data:`MUST_AGREE` and :data:`MUST_DIFFER`.
    """
    diffs = {}
    for a, b in MUST_AGREE + MUST_DIFFER:
        entry = {}
        for i, kind in enumerate(('class', 'mask')):
            x, ref = outputs[a][i].float(), outputs[b][i].float()
            if x.shape != ref.shape:
                raise AgreementError(f'{a} vs {b}: {kind} logits have shape {tuple(x.shape)} '
                                     f'vs {tuple(ref.shape)}')
            entry[kind] = float((x - ref).abs().max())
            entry[f'{kind}_scale'] = float(ref.abs().max())
        diffs[f'{a} vs {b}'] = entry
    return diffs


def check_agreement(diffs: Mapping[str, Mapping[str, float]], atol: float,
                    rtol: float) -> None:
    """Raise unless the pairs that must agree do and LoRA changes the outputs.

    A pair agrees when, for class and mask logits, ``max|a - b| <= atol + rtol * max|b|``.
    The ``lora vs ours`` pair must differ by more than :data:`LIVE_FACTOR` such tolerances
    in class or mask logits.

    Args:
        diffs: From :func:`agreement`.
        atol: Absolute tolerance.
        rtol: Tolerance relative to the reference's largest magnitude.

    Raises:
        AgreementError: Listing every violated check with its numbers.
    """
    errors = []
    for a, b in MUST_AGREE:
        entry = diffs[f'{a} vs {b}']
        for kind in ('class', 'mask'):
            tol = atol + rtol * entry[f'{kind}_scale']
            if not entry[kind] <= tol:  # also catches NaN
                errors.append(f'{a} vs {b}: {kind} logits differ by {entry[kind]:.3g} > '
                              f'{tol:.3g} (atol {atol:g} + rtol {rtol:g} * max|{b}| '
                              f'{entry[f"{kind}_scale"]:.3g})')
    for a, b in MUST_DIFFER:
        entry = diffs[f'{a} vs {b}']
        live = [entry[k] > LIVE_FACTOR * (atol + rtol * entry[f'{k}_scale'])
                for k in ('class', 'mask')]
        if not any(live):
            errors.append(f'{a} vs {b}: outputs differ by only {entry["class"]:.3g} (class) / '
                          f'{entry["mask"]:.3g} (mask), not more than {LIVE_FACTOR:g}x the '
                          'tolerance: the adapter does not change the model, so the merge '
                          'check proves nothing')
    if errors:
        raise AgreementError('output agreement failed:\n  ' + '\n  '.join(errors))


# ------------------------------------------------------------------------------ timing
def time_variants(fns: Mapping[str, Callable[[Tensor], Logits]], x: Tensor, repeats: int,
                  steps: int, warmup: int,
                  log: Optional[Callable[[str], None]] = None) -> Dict[str, List[dict]]:
    """Time every variant on ``x``, alternating them in rotated order over the rounds.

    Args:
        fns: Variant -> timed call (see :func:`logits_fn`).
        x: The input batch.
        repeats: Rounds.
        steps: Timed calls per variant and round.
        warmup: Untimed calls per variant before the first round.
        log: Called with a progress line after each round (None = silent).

    Returns:
        Variant -> one ``{'round', 'wall', 'cpu'}`` (seconds per call) per timed call.
    """
    names = list(fns)
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                fns[name](x)
        calls: Dict[str, List[dict]] = {name: [] for name in names}
        for rep in range(repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                for _ in range(steps):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    fns[name](x)
                    calls[name].append(dict(round=rep, wall=time.perf_counter() - start,
                                            cpu=time.process_time() - start_cpu))
            if log is not None:
                log(f'  round {rep + 1}/{repeats}: ' + ', '.join(
                    f"{name} {_ms(median(c['cpu'] for c in calls[name] if c['round'] == rep))}"
                    ' CPU' for name in names))
    return calls


def summarise(calls: Mapping[str, Sequence[Mapping[str, float]]], batch: int,
              baseline: str = BASELINE) -> Dict[str, dict]:
    """Medians per image and ratios to ``baseline`` from the timed calls.

    Args:
        calls: From :func:`time_variants`.
        batch: Images per call.
        baseline: The variant every other one is divided by.

    Returns:
        Variant -> ``wall_s`` / ``cpu_s`` (median seconds per image over every call),
        ``wall_x`` / ``cpu_x`` (those medians divided by the baseline's), and
        ``round_wall_x`` / ``round_cpu_x`` (per round, the variant's median over the
        baseline's median in that round).
    """
    if batch < 1:
        raise ValueError(f'batch must be >= 1, got {batch}')
    rows = {name: dict(wall_s=median(c['wall'] for c in runs) / batch,
                       cpu_s=median(c['cpu'] for c in runs) / batch)
            for name, runs in calls.items()}
    ratios = ratios_to(rows, baseline, ('wall_s', 'cpu_s'))
    rounds = sorted({c['round'] for c in calls[baseline]})
    for name, runs in calls.items():
        rows[name].update(wall_x=ratios[name]['wall_s'], cpu_x=ratios[name]['cpu_s'])
        for clock in ('wall', 'cpu'):
            per_round = []
            for r in rounds:
                mine = [c[clock] for c in runs if c['round'] == r]
                base = [c[clock] for c in calls[baseline] if c['round'] == r]
                if mine:
                    per_round.append(ratio(median(mine), median(base)))
            rows[name][f'round_{clock}_x'] = per_round
    return rows


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f'{ms:.2f} ms' if ms < 10 else f'{ms:.0f} ms'


def _spread(values: Sequence[float]) -> str:
    return f'{median(values):.3f} ({min(values):.3f}-{max(values):.3f})'


def report(rows: Mapping[str, dict], params: Mapping[str, int], header: str,
           what: Optional[Mapping[str, str]] = None) -> str:
    """The table: times per image with ratios to ``ours``, per-round ratios, parameters.

    ``what`` overrides :data:`VARIANTS`' descriptions (e.g. the transformers class).
    """
    what = {**VARIANTS, **(what or {})}
    table = [[name, what.get(name, name), f"{_ms(r['wall_s'])} ({r['wall_x']:.3f}x)",
              f"{_ms(r['cpu_s'])} ({r['cpu_x']:.3f}x)", _spread(r['round_wall_x']),
              _spread(r['round_cpu_x']), f'{params[name] / 1e6:.2f} M']
             for name, r in rows.items()]
    return header + '\n' + format_table(
        ['variant', 'what', 'wall / image (x ours)', 'CPU / image (x ours)',
         'per-round wall x ours: median (min-max)', 'per-round CPU x ours: median (min-max)',
         'parameters'], table)


# ours / hf at most this, by the median of the per-round CPU-time ratios: "faster than transformers"
# with a margin above this machine's round-to-round noise.
FASTER_THAN_HF = 0.97


def targets(rows: Mapping[str, dict]) -> List[str]:
    """The two targets: merged LoRA within 2% of no LoRA, this project faster than transformers.

    The first is judged on the ratios of medians (both clocks); the second on ``ours / hf`` by
    the ratios of medians (both clocks) and by the median of the per-round CPU ratios, each
    against :data:`FASTER_THAN_HF`.
    """
    lines = []
    if 'lora_merged' in rows:
        r = rows['lora_merged']
        verdict = {c: r[f'{c}_x'] <= 1.02 for c in ('wall', 'cpu')}
        lines.append('target "merged LoRA within 2% of no LoRA": lora_merged / ours = '
                     f'{r["wall_x"]:.3f} wall, {r["cpu_x"]:.3f} CPU -> '
                     + ', '.join(f'{c} {"met" if ok else "NOT met"}' for c, ok in verdict.items()))
    if 'hf' in rows:
        r = rows['hf']
        ours_over_hf = {'wall': 1.0 / r['wall_x'], 'cpu': 1.0 / r['cpu_x']}
        if r.get('round_cpu_x'):
            ours_over_hf['per-round CPU'] = 1.0 / median(r['round_cpu_x'])
        lines.append(f'target "this project faster than transformers (ours / hf <= '
                     f'{FASTER_THAN_HF})": ours / hf = '
                     + ', '.join(f'{v:.3f} {c}' for c, v in ours_over_hf.items())
                     + f' (hf / ours = {r["wall_x"]:.3f} wall, {r["cpu_x"]:.3f} CPU) -> '
                     + ', '.join(f'{c} {"met" if v <= FASTER_THAN_HF else "NOT met"}'
                                 for c, v in ours_over_hf.items()))
    return lines


# --------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backbone', choices=sorted(BACKBONES), default='dinov2',
                        help='EoMT-B/16 on DINOv2-reg4 (configs/eomt_lora_b640.py) or on DINOv3 '
                        '(configs/eomt/eomt-lora-r8_dinov3-b_*.py), against its transformers '
                        'counterpart')
    parser.add_argument('--size', type=int, default=None,
                        help=f"input side, multiple of 16 (default {FULL['size']}; "
                        f"--quick: {QUICK['size']})")
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=None,
                        help=f"rounds over the variants (default {FULL['repeats']}; "
                        f"--quick: {QUICK['repeats']})")
    parser.add_argument('--steps', type=int, default=None,
                        help=f"timed calls per variant and round (default {FULL['steps']}; "
                        f"--quick: {QUICK['steps']})")
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed calls per variant before the first round')
    parser.add_argument('--threads', type=int, default=1,
                        help="torch threads (0 = torch's choice); 1 keeps CPU time meaningful "
                        'on a shared machine')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--atol', type=float, default=1e-3,
                        help='absolute tolerance of the agreement checks')
    parser.add_argument('--rtol', type=float, default=1e-4,
                        help="tolerance relative to the reference's largest |logit|")
    parser.add_argument('--quick', action='store_true',
                        help='smaller defaults for a smoke-level run (explicit flags win)')
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=None,
                        help='variants to time (default: all; ours is always timed, as the '
                        'baseline); all four are still built and checked for agreement. Fewer '
                        'variants make shorter rounds, whose ratios drift less with the load')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='after the timing, profile ours and hf (torch.profiler, 2 calls '
                        'each) and print the N operators with most self CPU time side by side')
    parser.add_argument('--profile-shapes', action='store_true',
                        help='--profile rows per operator and input shapes')
    parser.add_argument('--out', help='write the results as JSON here')
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.size <= 0 or args.size % 16:
        parser.error(f'--size must be a positive multiple of 16, got {args.size}')
    if (min(args.batch, args.repeats, args.steps) < 1
            or min(args.warmup, args.threads, args.profile) < 0):
        parser.error('--batch, --repeats and --steps must be >= 1, --warmup, --threads and '
                     '--profile >= 0')
    if not (args.atol >= 0 and args.rtol >= 0):
        parser.error('--atol and --rtol must be >= 0')
    return args


def main(argv: Optional[Sequence[str]] = None, model_cfg: Optional[dict] = None,
         lora_config: Optional[dict] = None) -> int:
    """Run the benchmark.

    Args:
        argv: Command-line arguments (None = ``sys.argv``).
        model_cfg: Our EoMT config without LoRA; None = the ``--backbone``'s config file's. The
            backbone's ``img_size`` is set to ``--size``. (Tests pass a tiny model here.)
        lora_config: LoRA block of the ``lora`` variant; None = the config file's.

    Returns:
        0, or 1 when an agreement check fails.
    """
    import transformers
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    default_cfg, default_lora = default_model_configs(args.size, args.backbone)
    if model_cfg is None:
        model_cfg = default_cfg
    else:
        model_cfg = copy.deepcopy(model_cfg)
        model_cfg['backbone']['img_size'] = args.size
    lora_config = default_lora if lora_config is None else lora_config

    with tempfile.TemporaryDirectory(prefix='bench_inference_') as tmp:
        models = build_variants(model_cfg, lora_config, args.size, tmp, seed=args.seed)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    from eomt_mm.lora import LoRALinear
    lora_layers = sum(isinstance(m, LoRALinear) for m in models['lora'].modules())
    fns = {name: logits_fn(name, models[name]) for name in VARIANTS}
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        outputs = {name: fn(x) for name, fn in fns.items()}
    diffs = agreement(outputs)
    agreement_text = 'agreement (max |a - b|; max |b| in brackets): ' + '; '.join(
        f"{pair}: class {d['class']:.2e} [{d['class_scale']:.3g}], mask {d['mask']:.2e} "
        f"[{d['mask_scale']:.3g}]" for pair, d in diffs.items())
    try:
        check_agreement(diffs, args.atol, args.rtol)
    except AgreementError as exc:
        print(agreement_text, file=sys.stderr)
        print(f'error: {exc}', file=sys.stderr)
        return 1
    del outputs

    attn = getattr(models['hf'].config, '_attn_implementation', 'unknown')
    hf_what = {'hf': f'transformers {type(models["hf"]).__name__}'}
    header = (f'EoMT inference on {type(models["ours"].backbone).__name__} (class + mask '
              f'logits), {args.size}x{args.size}, batch '
              f'{args.batch}, {args.repeats} rounds x {args.steps} calls (+{args.warmup} '
              f'warm-up) | CPU: {cpu_name()} | {os.cpu_count()} cores | torch threads '
              f'{torch.get_num_threads()} | load avg {os.getloadavg()[0]:.1f} | torch '
              f'{torch.__version__} | transformers {transformers.__version__} (attention: '
              f"{attn}) | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(agreement_text, flush=True)
    timed = [n for n in VARIANTS if n == BASELINE or args.variants is None or n in args.variants]
    calls = time_variants({n: fns[n] for n in timed}, x, args.repeats, args.steps, args.warmup,
                          log=lambda line: print(line, flush=True))
    rows = summarise(calls, args.batch)
    text = report(rows, params, header, hf_what)
    lora_desc = (f"LoRA: rank {lora_config.get('rank')}, alpha {lora_config.get('lora_alpha')}"
                 f", on {lora_config.get('target_modules')}, {lora_layers} layers, random "
                 'lora_B (std 0.02)')
    lines = [text, agreement_text + f' (tolerance atol {args.atol:g} + rtol {args.rtol:g} * '
             'max|b|)', *targets(rows), lora_desc,
             'timed call: ours = model(x, mode="tensor"), hf = model(pixel_values=x); '
             'torch.inference_mode, eval', f'load average at the end: {os.getloadavg()[0]:.1f}']
    print('\n'.join(lines), flush=True)
    profile = None
    if args.profile:
        profiled = ('ours', 'hf')
        profile = op_profile({n: fns[n] for n in profiled}, x, calls=2,
                             by_shape=args.profile_shapes)
        print(f'\nprofile: self CPU time per call, top {args.profile} operators '
              f'(torch.profiler, 2 calls each, after the timing)')
        print(format_profile(profile, profiled, top=args.profile), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(header=header, args=vars(args), cpu=cpu_name(), rows=rows,
                           params=params, agreement=diffs, targets=targets(rows),
                           calls=calls,
                           profile=None if profile is None else {
                               name: [dict(op=k[0], shapes=k[1], self_cpu_s=v[0], count=v[1])
                                      for k, v in table.items()]
                               for name, table in profile.items()}), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
