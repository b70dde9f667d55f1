"""DINOv3's 2-D rotary position embedding (RoPE) for a grid of patch tokens.

DINOv3 (Siméoni et al., 2025; facebookresearch/dinov3 ``dinov3/layers/rope_position_encoding.py``,
transformers ``models/dinov3_vit/modeling_dinov3_vit.py``) has no learned position table.
Every forward builds the patch-centre coordinates of its own grid, normalised per axis to
``[-1, 1]`` (``normalize_coords='separate'``), optionally augments them while training, and
rotates the query / key channels of the patch tokens by angles ``2 * pi * coord / period`` with
``period_k = base ** (4k / head_dims)``, ``k < head_dims / 4``. The first ``head_dims / 2``
angles are ``[y-angles, x-angles]``; they are repeated once (``tile(2)``) and applied with the
"rotate half" convention ``x * cos + rotate_half(x) * sin``.

Why not mmpretrain's ``RotaryEmbeddingFast`` (EVA-02): it rotates interleaved channel pairs of
all tokens on a fixed, pre-scaled ``pt_seq_len`` grid with base 10000, which is a different
function; DINOv3's weights only work with the layout above.

The coordinate augmentations draw their random numbers in the same order, shapes and dtype as
transformers' ``augment_patches_center_coordinates`` (shift ``[1, 2]``, jitter ``[1, 2]``, rescale
``[1]``), so a seeded training-mode forward is reproducible against it.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['patch_center_coords', 'augment_coords', 'rope_cos_sin', 'rotate_patch_tokens']


def patch_center_coords(height: int, width: int, device: torch.device) -> Tensor:
    """Patch-centre coordinates of an ``height x width`` grid, each axis normalised to [-1, 1].

    Args:
        height: Number of patch rows.
        width: Number of patch columns.
        device: Device of the result.

    Returns:
        float32 ``[height * width, 2]``, row-major, columns ``(y, x)``.
    """
    coords_h = torch.arange(0.5, height, dtype=torch.float32, device=device) / height
    coords_w = torch.arange(0.5, width, dtype=torch.float32, device=device) / width
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing='ij'), dim=-1)
    return 2.0 * coords.flatten(0, 1) - 1.0


def augment_coords(coords: Tensor,
                   shift: Optional[float] = None,
                   jitter: Optional[float] = None,
                   rescale: Optional[float] = None) -> Tensor:
    """DINOv3's train-time coordinate augmentations (one random draw per call).

    Args:
        coords: ``[N, 2]`` coordinates from :func:`patch_center_coords`.
        shift: Add one uniform value in ``[-shift, shift]`` per axis (None: off).
        jitter: Multiply each axis by its own log-uniform factor in ``[1/jitter, jitter]``
            (None: off).
        rescale: Multiply both axes by one log-uniform factor in ``[1/rescale, rescale]``
            (None: off).

    Returns:
        The augmented ``[N, 2]`` coordinates (a new tensor; ``coords`` is not modified).
    """
    if shift is not None:
        coords = coords + torch.empty((1, 2), device=coords.device,
                                      dtype=coords.dtype).uniform_(-shift, shift)
    if jitter is not None:
        log_jitter = math.log(jitter)
        coords = coords * torch.empty((1, 2), device=coords.device, dtype=coords.dtype).uniform_(
            -log_jitter, log_jitter).exp()
    if rescale is not None:
        log_rescale = math.log(rescale)
        coords = coords * torch.empty(1, device=coords.device, dtype=coords.dtype).uniform_(
            -log_rescale, log_rescale).exp()
    return coords


def rope_cos_sin(coords: Tensor, head_dims: int, base: float) -> Tuple[Tensor, Tensor]:
    """Cosine and sine tables for rotating ``head_dims``-wide query / key heads.

    Args:
        coords: float32 ``[N, 2]`` patch coordinates.
        head_dims: Channels per attention head; must be a multiple of 4.
        base: RoPE base (DINOv3: 100).

    Returns:
        ``(cos, sin)``, each float32 ``[N, head_dims]``.
    """
    # Computed in float32 from `base` each time (not a stored, castable buffer): a model cast to
    # bf16 keeps exact periods, as transformers' float32 `inv_freq` does.
    exponents = torch.arange(0, head_dims // 4, dtype=torch.float32, device=coords.device)
    inv_periods = 1.0 / base ** (exponents * (4.0 / head_dims))
    angles = 2 * math.pi * coords.float()[:, :, None] * inv_periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.cos(angles), torch.sin(angles)


def rotate_patch_tokens(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the LAST ``cos.shape[0]`` tokens of ``x``; earlier (prefix) tokens pass unchanged.

    The prefix is whatever precedes the patch grid: CLS, register tokens and, inside EoMT's last
    blocks, the queries prepended in front of them.

    Args:
        x: Queries or keys ``[B, heads, N, head_dims]``.
        cos: ``[P, head_dims]`` with ``P <= N`` patch tokens.
        sin: ``[P, head_dims]``.

    Returns:
        ``[B, heads, N, head_dims]`` in ``x``'s dtype.
    """
    num_patches = cos.shape[0]
    prefix, patches = x[..., :-num_patches, :], x[..., -num_patches:, :]
    first, second = patches.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    patches = patches * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat((prefix, patches), dim=-2)
