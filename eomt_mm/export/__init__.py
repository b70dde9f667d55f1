"""Deployment exports of a trained (LoRA-merged) EoMT: see :mod:`.graph` and :mod:`.onnx_export`.

``torch.onnx`` and onnxruntime are imported only when an export or check runs (the ``export``
extra: ``pip install -e ".[export]"``).
"""
from .graph import ANOMALY_PREFIX, TENSOR_OUTPUTS, ExportableEoMT, InputNormalization
from .onnx_export import (INPUT_DTYPES, INPUT_NAME, MIN_OPSET, ExportError, check_export_size,
                          compare_with_onnxruntime, export_onnx)

__all__ = [
    'ExportableEoMT', 'InputNormalization', 'TENSOR_OUTPUTS', 'ANOMALY_PREFIX', 'ExportError',
    'check_export_size', 'export_onnx', 'compare_with_onnxruntime', 'INPUT_NAME', 'INPUT_DTYPES',
    'MIN_OPSET'
]
