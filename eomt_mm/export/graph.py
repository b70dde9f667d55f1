"""An export-ready module around a merged EoMT: raw images in, named output tensors out.

:class:`ExportableEoMT` is what ``tools/export_onnx.py`` hands to ``torch.onnx.export``. Its
forward is the whole-image inference of :class:`eomt_mm.models.segmentors.EoMT` (masked attention
off) with what normally happens outside the network moved inside the graph:

* input contract: ``images [B, 3, H, W]``, RGB, uint8 or float32 with values in 0..255, H and W
  multiples of the backbone's patch size. The data preprocessor's work happens in the graph:
  channel order (mmseg's pipelines decode images as BGR, so a config with ``bgr_to_rgb=True``
  trained on RGB and needs no swap, one without it trained on BGR and gets a flip), then
  ``(x - mean) / std`` with the config's ``mean`` / ``std``. Padding, resizing and sliding windows
  stay outside (see ``tools/export_onnx.py``).
* outputs, by name, in this order:

  ``seg_scores``
      ``[B, K, H, W]`` per-pixel class scores ``S_k = sum_q softmax(c_q)[k] sigmoid(m_q)`` at
      the input resolution (what ``EoMT.predict`` puts in ``seg_logits``; argmax = labels).
  ``class_logits``
      ``[B, Q, K + 1]`` final per-query class logits (last entry = no object).
  ``mask_logits``
      ``[B, Q, H / s, W / s]`` final per-query mask logits at network resolution (``s = 4`` for
      patch 16).
  ``anomaly_<name>``
      ``[B, H, W]`` float32 anomaly maps, higher = more anomalous, one per requested name of
      :data:`eomt_mm.anomaly.scores.SCORE_NAMES`, computed with the per-chunk function of
      :mod:`eomt_mm.anomaly.scores` on the mask logits upsampled to the input resolution (the
      whole-mode convention of ``AnomalyEoMT``), the whole image as one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eomt_mm.anomaly.scores import scores_on_chunk, check_score_names
from eomt_mm.lora import LoRALinear
from eomt_mm.models.segmentors import EoMT

__all__ = ['InputNormalization', 'ExportableEoMT', 'TENSOR_OUTPUTS', 'ANOMALY_PREFIX']

#: Output names that are not anomaly maps, in graph order.
TENSOR_OUTPUTS = ('seg_scores', 'class_logits', 'mask_logits')
#: Anomaly map ``name`` is the graph output ``ANOMALY_PREFIX + name``.
ANOMALY_PREFIX = 'anomaly_'
_PREPROCESSOR_TYPES = ('SegDataPreProcessor', 'mmseg.SegDataPreProcessor')


@dataclass(frozen=True)
class InputNormalization:
    """What the data preprocessor does to an RGB 0..255 image before the network.

    Attributes:
        mean: Per-channel mean, in the network's channel order.
        std: Per-channel standard deviation, same order.
        rgb_to_bgr: Whether the network was trained on BGR images, so that RGB input is flipped.
    """
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    rgb_to_bgr: bool

    @classmethod
    def from_config(cls, preprocessor: Optional[Mapping[str, Any]]) -> 'InputNormalization':
        """Read ``mean`` / ``std`` / ``bgr_to_rgb`` / ``rgb_to_bgr`` of a ``SegDataPreProcessor``.

        Args:
            preprocessor: The model's ``data_preprocessor`` config.

        Returns:
            The normalisation for RGB input. Without ``mean`` and ``std`` the preprocessor does
            not normalise, and neither does the graph (mean 0, std 1).

        Raises:
            ValueError: Not a ``SegDataPreProcessor`` config, or not 3-channel statistics.
        """
        if not isinstance(preprocessor, Mapping) or \
                preprocessor.get('type') not in _PREPROCESSOR_TYPES:
            kind = preprocessor.get('type') if isinstance(preprocessor, Mapping) else preprocessor
            raise ValueError("the exporter reproduces the normalisation of mmseg's "
                             "SegDataPreProcessor only; the model's data_preprocessor is "
                             f"{kind!r}. Set model.data_preprocessor=dict(type="
                             "'SegDataPreProcessor', mean=..., std=..., bgr_to_rgb=...)")
        mean, std = preprocessor.get('mean'), preprocessor.get('std')
        if (mean is None) != (std is None):
            raise ValueError('data_preprocessor needs both mean and std or neither, got '
                             f'mean={mean!r}, std={std!r}')
        if mean is None:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ValueError(f'data_preprocessor mean/std must be 3 values (RGB images) with std > '
                             f'0, got mean={list(mean)}, std={list(std)}')
        swap = bool(preprocessor.get('bgr_to_rgb', False) or preprocessor.get('rgb_to_bgr', False))
        # Images reach the preprocessor as mmcv decodes them, BGR: a channel swap there means the
        # network saw RGB, no swap means it saw BGR.
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std), not swap)


class ExportableEoMT(nn.Module):
    """A merged EoMT with normalisation, class scores and anomaly maps in one forward.

    Args:
        segmentor: An :class:`EoMT` (or ``AnomalyEoMT``) without LoRA layers (merge them first
            with :func:`eomt_mm.lora.merge_lora`). It is put in eval mode.
        normalization: From :meth:`InputNormalization.from_config`.
        outputs: Names among :data:`TENSOR_OUTPUTS`.
        scores: Anomaly score names (:data:`eomt_mm.anomaly.scores.SCORE_NAMES`).

    Raises:
        ValueError: Unknown output or score name, no output at all, or LoRA layers left.
        TypeError: ``segmentor`` is not an EoMT.
    """

    def __init__(self, segmentor: EoMT, normalization: InputNormalization,
                 outputs: Sequence[str] = ('seg_scores', ), scores: Sequence[str] = ()) -> None:
        super().__init__()
        if not isinstance(segmentor, EoMT):
            raise TypeError(f'ExportableEoMT wraps an EoMT segmentor, got '
                            f'{type(segmentor).__name__}')
        left = [name for name, module in segmentor.named_modules()
                if isinstance(module, LoRALinear)]
        if left:
            raise ValueError(f'{len(left)} LoRA layers are not merged (e.g. {left[0]!r}); call '
                             'eomt_mm.lora.merge_lora(model) before wrapping it for export')
        unknown = [name for name in outputs if name not in TENSOR_OUTPUTS]
        if unknown:
            raise ValueError(f'unknown outputs {unknown}; valid: {", ".join(TENSOR_OUTPUTS)} '
                             f'(anomaly maps are requested as scores)')
        self.outputs = [name for name in TENSOR_OUTPUTS if name in outputs]
        self.scores = check_score_names(list(scores)) if scores else []
        if not self.outputs and not self.scores:
            raise ValueError('nothing to export: ask for at least one output or score')
        self.segmentor = segmentor.eval()
        self.normalization = normalization
        self.register_buffer('mean', torch.tensor(normalization.mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor(normalization.std).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def patch_size(self) -> int:
        """Input sides must be multiples of this."""
        return int(self.segmentor.backbone.patch_size)

    @property
    def output_names(self) -> List[str]:
        """Names of the tensors :meth:`forward` returns, in order."""
        return self.outputs + [ANOMALY_PREFIX + name for name in self.scores]

    def normalize(self, images: Tensor) -> Tensor:
        """RGB 0..255 ``[B, 3, H, W]`` (any real or integer dtype) -> the network's input."""
        x = images.float()
        if self.normalization.rgb_to_bgr:
            x = x.flip(1)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        """Run the network on raw images.

        Args:
            images: ``[B, 3, H, W]`` RGB in 0..255 (see the module docstring).

        Returns:
            The tensors named by :attr:`output_names`, in that order.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'ExportableEoMT expects RGB images [B, 3, H, W], got '
                             f'{tuple(images.shape)}')
        mask_logits, class_logits = self.segmentor.forward_logits(self.normalize(images))
        result = dict(class_logits=class_logits, mask_logits=mask_logits)
        height, width = images.shape[-2:]
        if 'seg_scores' in self.outputs or self.scores:
            upsampled = F.interpolate(mask_logits, size=(height, width), mode='bilinear',
                                      align_corners=False)
            if 'seg_scores' in self.outputs:
                result['seg_scores'] = self.segmentor.decoder.semantic_map(class_logits,
                                                                           upsampled)
            if self.scores:
                for name, value in self._anomaly_maps(class_logits, upsampled).items():
                    result[ANOMALY_PREFIX + name] = value.reshape(-1, height, width)
        return tuple(result[name] for name in self.output_names)

    def _anomaly_maps(self, class_logits: Tensor, mask_logits: Tensor) -> dict:
        """``compute_anomaly_scores`` with the whole image as one chunk, in float32.

        ``compute_anomaly_scores`` itself loops over pixel chunks of a size fixed in Python and
        writes into preallocated maps, which would pin the graph to one image size; its
        per-chunk function is traceable and is used as is.
        """
        logits_all = class_logits.float()
        probs = logits_all.softmax(-1)[..., :-1]
        batch, queries = mask_logits.shape[:2]
        sig = mask_logits.float().reshape(batch, queries, -1).sigmoid()
        return scores_on_chunk(self.scores, probs, logits_all[..., :-1], probs.amax(dim=-1), sig)
