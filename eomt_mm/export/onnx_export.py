"""ONNX export of an :class:`~eomt_mm.export.graph.ExportableEoMT` and its check in onnxruntime.

The graph is captured with ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` plus the
onnxscript translation). The TorchScript exporter (``dynamo=False``) cannot be used: it has no
translation of the anti-aliased bicubic resize (``aten::_upsample_bicubic2d_aa``) with which
DINOv2 fits its position embedding to the patch grid whenever the input differs from the
backbone's ``img_size``, and tracing would freeze that grid anyway. ONNX ``Resize`` gained
``antialias`` in opset 18, the minimum used here.

Input sizes: fixed ``(H, W)``, or with ``dynamic=True`` any ``H = patch * h``, ``W = patch * w``
with ``h, w >= 2`` patches (``torch.export`` derived dimensions, so the multiple of the patch
size is part of the graph's contract). The batch dimension is dynamic in both cases (windows of
a sliding-window inference go through as one batch). Sizes are checked before tracing: a side
that is not a multiple of the patch size is an :class:`ExportError` naming the nearest valid
sizes.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from eomt_mm.utils.io import atomic_write
from .graph import ExportableEoMT

__all__ = ['ExportError', 'check_export_size', 'export_onnx', 'compare_with_onnxruntime',
           'MIN_OPSET', 'INPUT_NAME', 'INPUT_DTYPES']

#: ONNX Resize has ``antialias`` from opset 18 on.
MIN_OPSET = 18
INPUT_NAME = 'images'
INPUT_DTYPES = {'uint8': torch.uint8, 'float32': torch.float32}
# Example batch for tracing: torch.export specialises a dimension whose example size is 1, so the
# example has 2 images to keep the batch dynamic.
_EXAMPLE_BATCH = 2
# Fewest patches per side of a dynamic export: a 1-patch grid would also be specialised.
_MIN_GRID = 2


class ExportError(RuntimeError):
    """The model cannot be exported as asked (the message says what to change)."""


def check_export_size(height: int, width: int, patch_size: int) -> None:
    """Raise :class:`ExportError` unless both sides are positive multiples of the patch size.

    Args:
        height: Input height in pixels.
        width: Input width in pixels.
        patch_size: The backbone's patch size.
    """
    bad = [(name, side) for name, side in (('height', height), ('width', width))
           if not isinstance(side, int) or side < _MIN_GRID * patch_size or side % patch_size]
    if bad:
        def nearest(side):
            low = max(_MIN_GRID, side // patch_size) * patch_size
            return f'{low} or {low + patch_size}' if low != side else str(side)
        details = ', '.join(f'{name} {side}' for name, side in bad)
        raise ExportError(
            f'input size {height}x{width} cannot be exported: {details} is not a multiple of the '
            f'patch size {patch_size} of at least {_MIN_GRID} patches. Use e.g. '
            f'{nearest(height)} x {nearest(width)} (pad or resize images to it outside the graph, '
            'or run sliding windows of such a size)')


def _example_images(height: int, width: int, dtype: torch.dtype, batch: int = _EXAMPLE_BATCH,
                    seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=gen).to(dtype)


def export_onnx(module: ExportableEoMT, out: str, size: Tuple[int, int], dynamic: bool = False,
                input_dtype: str = 'uint8', opset: int = MIN_OPSET) -> None:
    """Export ``module`` to the ONNX file ``out`` (written atomically).

    Args:
        module: The model to export.
        out: Path of the ``.onnx`` file; an existing file is replaced only once the export has
            succeeded.
        size: ``(H, W)`` of a fixed-size export, or the example size of a dynamic one.
        dynamic: Height and width dynamic (multiples of the patch size, at least 2 patches).
        input_dtype: ``'uint8'`` or ``'float32'`` (values 0..255 either way).
        opset: ONNX opset, at least :data:`MIN_OPSET`.

    Raises:
        ExportError: Bad size, dtype or opset, or the exporter failed.
    """
    height, width = size
    patch = module.patch_size
    check_export_size(height, width, patch)
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f'input_dtype must be one of {sorted(INPUT_DTYPES)}, got '
                          f'{input_dtype!r}')
    if opset < MIN_OPSET:
        raise ExportError(f'opset {opset} is too old: the graph needs Resize with antialias '
                          f'(opset >= {MIN_OPSET})')
    module.eval()
    example = _example_images(height, width, INPUT_DTYPES[input_dtype])
    dims = {0: torch.export.Dim('batch', min=1)}
    if dynamic:
        dims[2] = patch * torch.export.Dim('grid_height', min=_MIN_GRID)
        dims[3] = patch * torch.export.Dim('grid_width', min=_MIN_GRID)
    with torch.no_grad():
        try:
            program = torch.onnx.export(module, (example, ), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME],
                                        output_names=module.output_names,
                                        dynamic_shapes={'images': dims}, verbose=False)
        except Exception as err:  # the exporter raises many types; keep the cause visible
            raise ExportError(f'torch.onnx.export failed: {type(err).__name__}: {err}') from err
    # Models above protobuf's 2 GiB limit need external data files next to the graph, whose
    # names would follow the temporary file; refuse rather than write a broken pair.
    atomic_write(out, lambda tmp: program.save(tmp, external_data=False))


def compare_with_onnxruntime(module: ExportableEoMT, onnx_path: str,
                             sizes: Sequence[Tuple[int, int]], input_dtype: str = 'uint8',
                             batch: int = 1, threads: Optional[int] = None,
                             seed: int = 0) -> Dict[Tuple[int, int], Dict[str, float]]:
    """Run the exported file in onnxruntime (CPU) and ``module`` in PyTorch on the same images.

    Args:
        module: The exported module.
        onnx_path: The ``.onnx`` file.
        sizes: ``(H, W)`` sizes to run (one for a fixed export, several for a dynamic one).
        input_dtype: The export's input dtype.
        batch: Images per run.
        threads: onnxruntime intra-op threads (None = its default).
        seed: Seed of the random images.

    Returns:
        size -> output name -> ``max |onnx - torch| / max |torch|``.

    Raises:
        ExportError: onnxruntime is missing, or an output has another shape than in PyTorch.
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportError('onnxruntime is not installed: pip install -e ".[export]"') from err
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(os.fspath(onnx_path), options,
                                           providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    if names != module.output_names:
        raise ExportError(f'{onnx_path}: outputs {names}, expected {module.output_names}')
    result = {}
    for index, (height, width) in enumerate(sizes):
        images = _example_images(height, width, INPUT_DTYPES[input_dtype], batch, seed + index)
        with torch.no_grad():
            reference = [t.float().numpy() for t in module.eval()(images)]
        try:
            outputs = session.run(None, {INPUT_NAME: images.numpy()})
        except Exception as err:  # onnxruntime's own exception types
            raise ExportError(
                f'{onnx_path} does not run at {height}x{width} in onnxruntime ({err}). For a '
                'dynamic export this means the graph was specialised to the example size: some '
                'code in the model turns a traced size into a Python int') from err
        diffs = {}
        for name, ref, got in zip(names, reference, outputs):
            if got.shape != ref.shape:
                raise ExportError(f'{onnx_path} at {height}x{width}: output {name} has shape '
                                  f'{got.shape}, PyTorch {ref.shape}')
            scale = max(float(np.abs(ref).max()), np.finfo(np.float32).tiny)
            diffs[name] = float(np.abs(got.astype(np.float32) - ref).max()) / scale
        result[(height, width)] = diffs
    return result
