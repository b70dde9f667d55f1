"""Which scaled-dot-product-attention kernel EoMT's inference runs.

EoMT is fast at inference because masked attention is off there, so ``F.scaled_dot_product_attention``
can pick a fused kernel (flash or memory-efficient attention) instead of the math fallback that
materialises the attention matrix. Two looks: the bf16 forward pass under
``torch.nn.attention.sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])``, which raises when no
allowed kernel fits, and a profile of the plain forward pass, whose aten op names say which
backend ran (``aten::_scaled_dot_product_flash_attention`` and so on; on a GPU also the kernel
names). The masked attention of training is profiled too, for information.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import inference as bench_inference

from .parts import Record, Settings
from .speed import BF16_RTOL, build_models, relative_difference

# aten op name fragment -> backend.
_BACKEND_OPS = (('_scaled_dot_product_flash_attention', 'flash'),
                ('_scaled_dot_product_efficient_attention', 'efficient'),
                ('_scaled_dot_product_cudnn_attention', 'cudnn'),
                ('_scaled_dot_product_attention_math', 'math'),
                ('_scaled_dot_product_fused_attention_overrideable', 'overrideable'))
FUSED = ('flash', 'efficient', 'cudnn')


def profile_sdpa(fn: Callable[[], object], device: str) -> Dict[str, object]:
    """Run ``fn`` under the profiler and count the SDPA backends' ops.

    Args:
        fn: The call to profile.
        device: ``'cuda'`` also records GPU kernels.

    Returns:
        ``backends``: backend -> number of calls; ``kernels``: names of GPU kernels that look
        like attention (``flash``, ``fmha``, ``attention``, ``sdpa`` in the name).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == 'cuda' else [])
    with profile(activities=activities) as prof:
        fn()
        if device == 'cuda':
            torch.cuda.synchronize()
    backends: Dict[str, int] = {}
    kernels: List[str] = []
    for event in prof.key_averages():
        for fragment, backend in _BACKEND_OPS:
            # The dispatcher's own op and the backward / 'for_cpu' variants all name it.
            if event.key.startswith('aten::') and fragment in event.key:
                backends[backend] = backends.get(backend, 0) + event.count
                break
        device_type = str(getattr(event, 'device_type', ''))
        if 'CUDA' in device_type and any(w in event.key.lower()
                                         for w in ('flash', 'fmha', 'attention', 'sdpa')):
            kernels.append(event.key[:120])
    return dict(backends=backends, kernels=sorted(set(kernels)))


def sdpa_check(settings: Settings, record: Record, shared: dict) -> None:
    """Flash / efficient attention at inference: allowed-only context and a profile."""
    models = build_models(settings, shared)
    ours, hf, x = models['bf16']['ours'], models['bf16']['hf'], models['x_bf16']
    num_layers = ours.backbone.num_layers
    run_ours = bench_inference.logits_fn('ours', ours)
    with torch.inference_mode():
        plain = run_ours(x)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                fused = run_ours(x)
        except RuntimeError as exc:
            record.check('inference runs with only flash / efficient SDPA allowed', False,
                         str(exc).splitlines()[0][:300])
            fused = None
    if fused is not None:
        rel = max(relative_difference(fused[i], plain[i]) for i in range(2))
        record.check('inference runs with only flash / efficient SDPA allowed', True,
                     f'outputs vs the default choice: {rel:.2e} of the largest logit')
        record.check('same outputs with only flash / efficient allowed', rel <= BF16_RTOL,
                     f'{rel:.2e} <= {BF16_RTOL:g}')
    with torch.inference_mode():
        seen = profile_sdpa(lambda: run_ours(x), settings.device)
        seen_hf = profile_sdpa(lambda: bench_inference.logits_fn('hf', hf)(x), settings.device)
    record.metrics['ours'] = seen
    record.metrics['hf'] = seen_hf
    used = seen['backends']
    fused_calls = sum(used.get(b, 0) for b in FUSED)
    record.check('default inference uses a fused SDPA kernel in every block, never math',
                 fused_calls == num_layers and not used.get('math'),
                 f'{used} over {num_layers} blocks; GPU kernels: {seen["kernels"] or "-"}')
    record.note(f"transformers' EoMT at inference: {seen_hf['backends']} "
                f"(attention: {getattr(hf.config, '_attn_implementation', 'unknown')})")
    # Training runs masked attention (boolean masks), at its start with every mask kept (the
    # converted weights carry a trained model's probabilities, 0): which kernel that gets, for
    # information.
    probs = ours.decoder.attn_mask_probs.clone()
    ours.train()
    try:
        ours.decoder.attn_mask_probs.fill_(1.0)
        with torch.no_grad():
            masked = profile_sdpa(lambda: ours(x, mode='tensor'), settings.device)
    finally:
        ours.decoder.attn_mask_probs.copy_(probs)
        ours.eval()
    record.metrics['ours_training_masked'] = masked
    record.note(f"training with masked attention: {masked['backends']}")
