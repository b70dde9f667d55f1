"""Resampling of ViT position embeddings and patch-embedding kernels.

Both functions are written here instead of reused because the stack lacks them in the form
DINOv2 / EoMT need:

* mmpretrain's ``resize_pos_embed`` interpolates without anti-aliasing and always assumes the
  CLS position is part of the table; timm (which the EoMT reference is built on) resizes the
  patch-only table with ``bicubic`` *and* ``antialias=True``, which differs when shrinking a grid.
* Neither mmpretrain nor mmcv can resample a patch kernel (14x14 -> 16x16). The reference does it
  once at load time with the FlexiViT pseudo-inverse resize; timm is only a test dependency here,
  so the converter carries its own implementation (tests check equality with timm's).
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def _pair(size: int | Sequence[int], name: str) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    # Symbolic sizes stay symbolic under torch.export (dynamic ONNX export of the backbone).
    size = tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f'{name} must be an int or a (height, width) pair, got {size}')
    return size


def resize_pos_embed_grid(pos_embed: torch.Tensor,
                          src_hw: int | Sequence[int],
                          dst_hw: int | Sequence[int],
                          mode: str = 'bicubic',
                          antialias: bool = True) -> torch.Tensor:
    """Resize a patch-only absolute position embedding table to another grid.

    Args:
        pos_embed: Tensor ``[1, src_h * src_w, C]`` (no CLS / register entries).
        src_hw: Grid the table was trained on, ``(h, w)`` or an int for a square grid.
        dst_hw: Target grid ``(h, w)`` or an int.
        mode: ``torch.nn.functional.interpolate`` mode.
        antialias: Anti-alias when shrinking (timm's default, which the EoMT reference uses).

    Returns:
        Tensor ``[1, dst_h * dst_w, C]`` in the dtype of ``pos_embed`` (interpolated in float32).
    """
    src_h, src_w = _pair(src_hw, 'src_hw')
    dst_h, dst_w = _pair(dst_hw, 'dst_hw')
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f'pos_embed must have shape [1, L, C], got {tuple(pos_embed.shape)}')
    if pos_embed.shape[1] != src_h * src_w:
        raise ValueError(f'pos_embed has {pos_embed.shape[1]} positions but the source grid '
                         f'{src_h}x{src_w} needs {src_h * src_w}')
    # Only concrete sizes are compared: a comparison with a symbolic size would pin the exported
    # graph to the example's grid.
    if all(isinstance(v, int) for v in (dst_h, dst_w)) and (src_h, src_w) == (dst_h, dst_w):
        return pos_embed
    channels = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, src_h, src_w, channels).permute(0, 3, 1, 2)
    # bicubic/bilinear accept antialias; nearest-style modes reject the flag.
    extra = dict(antialias=antialias) if mode in ('bilinear', 'bicubic') else {}
    grid = F.interpolate(grid, size=(dst_h, dst_w), mode=mode,
                         align_corners=False if mode in ('bilinear', 'bicubic') else None, **extra)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_h * dst_w, channels).to(pos_embed.dtype)


def resample_patch_kernel(weight: torch.Tensor,
                          new_size: int | Sequence[int],
                          mode: str = 'bicubic',
                          antialias: bool = True) -> torch.Tensor:
    """Resample a patch-embedding convolution kernel (FlexiViT pseudo-inverse resize).

    The new kernel ``w'`` is chosen so that ``<resize(x), w'> ~= <x, w>`` for every patch ``x``:
    with ``R`` the linear map "resize a patch from old to new size", ``w' = pinv(R^T) w``. A ViT
    using the new kernel on images resized by the same factor then sees (nearly) the same tokens.

    Args:
        weight: Conv kernel ``[C_out, C_in, h, w]``.
        new_size: Target kernel size ``(h', w')`` or an int.
        mode: Interpolation used to build ``R``.
        antialias: Anti-alias in ``R`` (timm's default).

    Returns:
        Kernel ``[C_out, C_in, h', w']`` in the dtype of ``weight`` (computed in float32).
    """
    if weight.ndim != 4:
        raise ValueError(f'patch kernel must be 4-D [C_out, C_in, h, w], got {tuple(weight.shape)}')
    old_h, old_w = weight.shape[-2:]
    new_h, new_w = _pair(new_size, 'new_size')
    if (old_h, old_w) == (new_h, new_w):
        return weight
    # Column j of R is the resized j-th one-hot old-size patch.
    basis = torch.eye(old_h * old_w, dtype=torch.float32).reshape(-1, 1, old_h, old_w)
    resized = F.interpolate(basis, size=(new_h, new_w), mode=mode, antialias=antialias,
                            align_corners=False)
    resize_mat = resized.reshape(old_h * old_w, new_h * new_w).T  # [new, old]
    pinv = torch.linalg.pinv(resize_mat)  # [old, new]
    c_out, c_in = weight.shape[:2]
    out = weight.reshape(c_out, c_in, old_h * old_w).float() @ pinv
    return out.reshape(c_out, c_in, new_h, new_w).to(weight.dtype)
