"""Typed results of the EoMT network and of its inference pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional

from torch import Tensor

from ..utils.geometry import SlideLayout

__all__ = ['EoMTPredictions', 'InferenceOutputs']


class EoMTPredictions(NamedTuple):
    """Every prediction of one network pass, the final one last.

    With masked attention (training) there are ``L2 + 1`` predictions (one before each query
    block, then the final one); otherwise one. A named tuple, so it also unpacks as
    ``mask_logits_per_layer, class_logits_per_layer``.

    Attributes:
        mask_logits: ``[B, Q, H/4, W/4]`` per prediction (patch 16).
        class_logits: ``[B, Q, K + 1]`` per prediction.
    """
    mask_logits: List[Tensor]
    class_logits: List[Tensor]


@dataclass
class InferenceOutputs:
    """What :meth:`EoMT.inference` returns, the same fields in whole and slide mode.

    Attributes:
        seg_logits: ``[B, K, H, W]`` per-pixel class scores at the (padded) input resolution.
        mask_logits: ``[N * B, Q, h, w]`` final mask logits at network resolution of each of the
            ``N`` windows (whole mode: ``N = 1``, the whole input); window ``j`` of image ``i``
            is at ``j * B + i``.
        class_logits: ``[N * B, Q, K + 1]`` final class logits, same order.
        layout: The sliding-window layout, or None in whole mode.
    """
    seg_logits: Tensor
    mask_logits: Tensor
    class_logits: Tensor
    layout: Optional[SlideLayout] = None

    @property
    def batch_size(self) -> int:
        """Number of images B."""
        return self.seg_logits.shape[0]

    @property
    def input_size(self) -> tuple:
        """``(H, W)`` of the (padded) network input."""
        return tuple(self.seg_logits.shape[-2:])
