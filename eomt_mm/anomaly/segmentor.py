"""``AnomalyEoMT``: EoMT with anomaly scores in its predictions and optional outlier exposure.

It adds two things to :class:`eomt_mm.models.segmentors.EoMT` and changes nothing else (same
modules, same state-dict keys: a checkpoint of a plain EoMT loads into it unchanged and back):

* ``test_cfg.anomaly_scores`` (names of :data:`eomt_mm.anomaly.scores.SCORE_NAMES`): every
  prediction also gets ``data_sample.anomaly_scores``, one ``[1, H, W]`` float32 map per name at
  ``ori_shape``, computed in float32 from mask logits brought to the label resolution (never by
  resizing score maps made at network resolution: the scores are non-linear in the mask logits).

  * whole mode: per image, the final mask logits are bilinearly upsampled to the (padded)
    network input, the padding is cut and the flip undone, they are resized to ``ori_shape``
    (the Mask2Former / RbA ``sem_seg_postprocess`` convention), then scored. One image's
    ``Q x H x W`` float32 logits are alive at a time.
  * slide mode: each window has its own query set, so mask logits of different windows cannot
    be stitched, only score maps: every window is scored from its mask logits upsampled
    straight to its footprint on a label-scale canvas (:func:`canvas_spans`), the maps are
    averaged where windows overlap, and the canvas is restored to ``ori_shape``.

* ``outlier_loss`` (an :class:`OutlierExposureLoss`, e.g. ``RbALoss``): pixels that
  ``PasteOutliers`` labelled ``outlier_label`` are ignored by the closed-set set loss, and the
  outlier loss is added on the final prediction with the mask logits upsampled to the label size.

The anomaly configs switch it on with one line: ``model = dict(type='AnomalyEoMT', ...)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import SampleList
from torch import Tensor

from eomt_mm.models.segmentors import EoMT
from eomt_mm.models.segmentors.structures import EoMTPredictions, InferenceOutputs
from eomt_mm.models.utils.geometry import (canvas_spans, image_geometry, restore_geometry,
                                           stitch_on_canvas)

from .outlier_loss import OutlierExposureLoss
from .scores import check_score_names, compute_anomaly_scores

__all__ = ['AnomalyEoMT']


@MODELS.register_module()
class AnomalyEoMT(EoMT):
    """EoMT that also predicts anomaly score maps and can train with outlier exposure.

    Args:
        *args: :class:`EoMT` arguments. ``test_cfg`` may hold ``anomaly_scores`` (list of score
            names); without it predictions are those of :class:`EoMT`.
        outlier_loss: Optional config of an :class:`OutlierExposureLoss` (mmseg ``MODELS``),
            e.g. ``dict(type='RbALoss')``. None = plain closed-set training.
        outlier_label: ``gt_sem_seg`` value of pasted outlier pixels (the ``paste_label`` of
            :class:`eomt_mm.anomaly.paste_outliers.PasteOutliers`). Only read when
            ``outlier_loss`` is set.
        **kwargs: :class:`EoMT` keyword arguments.
    """

    _accepts_anomaly_scores = True

    def __init__(self, *args, outlier_loss: Optional[dict] = None, outlier_label: int = 254,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        names = self.test_cfg.get('anomaly_scores')
        if names is not None and (isinstance(names, str) or not all(
                isinstance(n, str) for n in names)):
            raise ValueError('AnomalyEoMT test_cfg.anomaly_scores must be a list of score names, '
                             f'got {names!r}')
        self.anomaly_scores = check_score_names(names) if names else []
        self.outlier_label = outlier_label
        self.outlier_loss = None
        if outlier_loss is not None:
            loss = MODELS.build(outlier_loss)
            if not isinstance(loss, OutlierExposureLoss):
                raise TypeError(f'AnomalyEoMT outlier_loss must build an OutlierExposureLoss '
                                f'(eomt_mm.anomaly.outlier_loss), got {type(loss).__name__}')
            self.outlier_loss = loss
            self._check_outlier_label()

    def _check_outlier_label(self) -> None:
        """The pasted-outlier label must be distinguishable from classes and ignore."""
        label, ignore = self.outlier_label, self.decoder.ignore_index
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= 255:
            raise ValueError(f'AnomalyEoMT outlier_label must be an int in [0, 255] (the '
                             f'PasteOutliers paste_label), got {label!r}')
        if label < self.num_classes or label == ignore:
            raise ValueError(
                f'AnomalyEoMT outlier_label={label} collides with a class id (0..'
                f'{self.num_classes - 1}) or the set-loss ignore_index={ignore}; use a free value '
                'such as 254 and the same value as PasteOutliers paste_label')

    # ------------------------------------------------------------------ training
    def loss(self, inputs: Tensor, data_samples: SampleList) -> dict:
        """Set losses, plus the outlier loss on the final prediction when configured.

        Args:
            inputs: Normalised images ``[B, C, H, W]``.
            data_samples: Samples with ``gt_sem_seg``.

        Returns:
            The loss dict of :meth:`loss_from_predictions`.
        """
        predictions = self.run_network(inputs, masked_attn=self._masked_attn())
        return self.loss_from_predictions(predictions, data_samples)

    def loss_from_predictions(self, predictions: EoMTPredictions,
                              data_samples: SampleList) -> dict:
        """The losses of already computed predictions (:meth:`run_network`'s output).

        Separate from :meth:`loss` so that a caller holding the predictions of several models
        from one pass (an adapter ensemble's members) scores each with this code.

        Args:
            predictions: Every prediction of one pass (masked-attention ones included).
            data_samples: Samples with ``gt_sem_seg``, one per prediction row.

        Returns:
            The set-loss dict (pasted pixels ignored) and ``outlier_loss.loss_name``.
        """
        if self.outlier_loss is None:
            return self.decoder.loss(predictions.mask_logits, predictions.class_logits,
                                     data_samples)
        gt = _stack_gt(data_samples)
        ignore = self.decoder.ignore_index
        outlier = gt == self.outlier_label
        closed = _with_gt(data_samples, gt.masked_fill(outlier, ignore))
        losses = self.decoder.loss(predictions.mask_logits, predictions.class_logits, closed)
        loss = self.outlier_loss
        target = torch.full_like(gt, loss.ignore_index)
        target[(gt != ignore) & ~outlier] = 0
        target[outlier] = loss.outlier_label
        if loss.loss_name in losses:
            raise KeyError(f'AnomalyEoMT outlier_loss name {loss.loss_name!r} collides with a '
                           'set-loss key')
        # float32 outside autocast: the RbA score is a sum of K saturating tanh terms whose
        # hinge margins half precision would blur.
        final_masks = predictions.mask_logits[-1]
        with torch.autocast(device_type=final_masks.device.type, enabled=False):
            masks = F.interpolate(final_masks.float(), size=gt.shape[-2:],
                                  mode='bilinear', align_corners=False)
            losses[loss.loss_name] = loss(predictions.class_logits[-1].float(), masks, target)
        return losses

    # ------------------------------------------------------------------ inference
    def postprocess_result(self, outputs: InferenceOutputs | Tensor,
                           data_samples: Optional[SampleList] = None) -> SampleList:
        """:meth:`EoMT.postprocess_result`, plus ``anomaly_scores`` when configured."""
        data_samples = super().postprocess_result(outputs, data_samples)
        if not self.anomaly_scores or not isinstance(outputs, InferenceOutputs):
            return data_samples
        # Under AMP, autocast would run the interpolation and the score einsums in half
        # precision; the protocol wants float32 (RbA saturates and ties break FPR95).
        with torch.autocast(device_type=outputs.seg_logits.device.type, enabled=False):
            for i, sample in enumerate(data_samples):
                scores = self._image_scores(outputs, i, sample.metainfo or None)
                sample.anomaly_scores = PixelData(**scores)
        return data_samples

    def _score(self, class_logits: Tensor, mask_logits: Tensor) -> Dict[str, Tensor]:
        """``[1, H, W]`` float32 map per configured score name."""
        scores = compute_anomaly_scores(class_logits.float(), mask_logits.float(),
                                        self.anomaly_scores)
        return {name: scores[name][0:1].float() for name in self.anomaly_scores}

    def _image_scores(self, outputs: InferenceOutputs, index: int,
                      meta: Optional[dict]) -> Dict[str, Tensor]:
        """Score maps of image ``index`` at its label resolution (see the module docstring)."""
        batch = outputs.batch_size
        if outputs.layout is None:
            geometry = image_geometry(meta, outputs.input_size)
            masks = F.interpolate(outputs.mask_logits[index:index + 1].float(),
                                  size=outputs.input_size, mode='bilinear', align_corners=False)
            masks = restore_geometry(masks, geometry, self.align_corners)
            return self._score(outputs.class_logits[index:index + 1], masks)
        spans = canvas_spans(outputs.layout, image_geometry(meta, outputs.layout.input))
        per_window = []
        for j in range(len(spans.spans)):
            k = j * batch + index
            masks = F.interpolate(outputs.mask_logits[k:k + 1].float(),
                                  size=spans.window_size(j), mode='bilinear', align_corners=False)
            per_window.append(self._score(outputs.class_logits[k:k + 1], masks))
            del masks
        return {name: stitch_on_canvas([w[name] for w in per_window], spans)
                for name in self.anomaly_scores}


def _stack_gt(data_samples: Sequence[SegDataSample]) -> Tensor:
    """``[B, H, W]`` labels; the data preprocessor pads them to one size."""
    labels = []
    for sample in data_samples:
        if 'gt_sem_seg' not in sample:
            raise KeyError('AnomalyEoMT loss needs data_samples with gt_sem_seg')
        labels.append(sample.gt_sem_seg.data.reshape(sample.gt_sem_seg.data.shape[-2:]))
    shapes = {tuple(x.shape) for x in labels}
    if len(shapes) != 1:
        raise ValueError(f'AnomalyEoMT outlier loss needs gt_sem_seg maps of one size (the data '
                         f'preprocessor pads them), got {sorted(shapes)}')
    return torch.stack(labels)


def _with_gt(data_samples: Sequence[SegDataSample], gt: Tensor) -> SampleList:
    """New samples (same metainfo) holding ``gt``: the caller's samples stay untouched."""
    out = []
    for sample, labels in zip(data_samples, gt):
        new = SegDataSample(metainfo=sample.metainfo)
        new.gt_sem_seg = PixelData(data=labels[None], metainfo=sample.gt_sem_seg.metainfo)
        out.append(new)
    return out
