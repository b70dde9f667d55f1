"""Convert DINOv2 / DINOv3 / EoMT checkpoints users already have into this project's format.

Layout (one module per job):

* :mod:`~eomt_mm.converters.common`: the error, the report, weights-only reading of sources,
  renaming by regex rules, the key-and-shape check against a module, atomic writing of
  ``{'state_dict': ..., 'meta': {...}}``;
* :mod:`~eomt_mm.converters.vit`: what the two backbone families share (the block names, the
  SwiGLU width, the preset check);
* :mod:`~eomt_mm.converters.dinov2`: the DINOv2 backbone family (Meta hub and timm layouts);
* :mod:`~eomt_mm.converters.eomt`: full EoMT checkpoints (official and Hugging Face layouts) and
  the decoder key table :data:`DECODER_KEY_MAP`;
* :mod:`~eomt_mm.converters.dinov3`: the DINOv3 backbone family (Meta hub and transformers
  layouts); :mod:`~eomt_mm.converters.eomt_dinov3`: EoMT on DINOv3 (transformers' layout and
  the reference's delta checkpoints, added to their ``--base`` DINOv3 weights);
* :mod:`~eomt_mm.converters.formats`: :data:`FORMATS`, the table of source formats, and the
  entry points :func:`convert_state_dict` / :func:`convert_file`.

Every source key must be mapped or explicitly skipped (with a reason that is printed); the
converted weights are checked key-by-key and shape-by-shape against the project's modules built
on the ``meta`` device. Anything else raises :class:`CheckpointConversionError` listing the
offending keys. Sources are read with ``torch.load(weights_only=True)`` or safetensors; the
output is weights-only loadable. This package imports the models; the models never import it.
"""
from .common import (FORMAT_VERSION, CheckpointConversionError, ConversionReport,
                     load_source_state_dict, save_converted)
from .dinov2 import infer_backbone_arch
from .eomt import DECODER_KEY_MAP
from .formats import FORMATS, SourceFormat, convert_file, convert_state_dict

__all__ = [
    'FORMAT_VERSION', 'CheckpointConversionError', 'ConversionReport', 'load_source_state_dict',
    'save_converted', 'infer_backbone_arch', 'DECODER_KEY_MAP', 'FORMATS', 'SourceFormat',
    'convert_file', 'convert_state_dict'
]
