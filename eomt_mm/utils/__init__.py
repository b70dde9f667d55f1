"""Leaf helpers used across the package: ViT resampling, atomic file writes, model unwrapping.

Nothing here imports another part of ``eomt_mm``.
"""
from .io import atomic_write, atomic_write_bytes, stale_temp_files, temp_name_for
from .model import unwrap_model
from .resample import resample_patch_kernel, resize_pos_embed_grid

__all__ = [
    'atomic_write', 'atomic_write_bytes', 'stale_temp_files', 'temp_name_for', 'unwrap_model',
    'resample_patch_kernel', 'resize_pos_embed_grid'
]
