"""EoMT ("Your ViT is Secretly an Image Segmentation Model") as an mmseg segmentor.

The forward pass (reference: tue-mps/eomt ``models/eomt.py``)::

    x, (h, w) = backbone.embed(img)                      # [CLS, registers, patches]
    for i < L - L2:  x = backbone.forward_block(i, x)
    x = [queries; x]
    for the last L2 blocks j = 0..L2-1:
        if training with masked attention:
            intermediate prediction on final_norm(x) -> attention mask for block j
        x = backbone.forward_block(L - L2 + j, x, mask)
    final prediction on final_norm(x)

Per-pixel class scores ``S_k = sum_q softmax(class_q)[k] * sigmoid(mask_q)`` (K real classes,
mask logits bilinearly upsampled first). Normalisation is the data preprocessor's job only.

Anomaly scores (``test_cfg.anomaly_scores``) follow the pooled protocol of anomaly.md: in
float32, from mask logits upsampled to the label resolution (whole mode: exactly; slide mode:
per window, at label scale, then stitched; see :meth:`EoMT.postprocess_result`). Optional
outlier exposure: ``outlier_loss`` (e.g. RbA) on pixels that ``PasteOutliers`` labelled
``outlier_label``.
"""
import math
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS
from mmseg.utils import OptConfigType, OptMultiConfig, SampleList
from torch import Tensor
from torch.utils.checkpoint import checkpoint

PredList = Tuple[List[Tensor], List[Tensor]]


class _SlideLayout(NamedTuple):
    """Sliding-window placement: square ``crop`` windows on the input resized from ``input``
    to ``resized`` (short side = crop), starting at ``starts`` along the long axis (rows if
    ``along_h``)."""
    crop: int
    input: Tuple[int, int]
    resized: Tuple[int, int]
    along_h: bool
    starts: Tuple[int, ...]


@MODELS.register_module()
class EoMT(BaseSegmentor):
    """Encoder-only Mask Transformer for semantic segmentation.

    Args:
        backbone: Config of a backbone with the block-level API of
            :class:`eomt_mm.models.backbones.DINOv2` (``embed``, ``forward_block``,
            ``final_norm``, ``num_layers``, ``num_prefix_tokens``, ``embed_dims``, ``patch_size``).
        decoder: Config of :class:`eomt_mm.models.decode_heads.EoMTDecoder`; ``embed_dims`` and
            ``patch_size`` default to the backbone's (a mismatch is an error).
        data_preprocessor: mmseg ``SegDataPreProcessor`` config; it normalises the images, this
            model never does.
        train_cfg: Unused, accepted for mmseg config compatibility.
        test_cfg: Inference settings: ``mode='whole'`` (default) or ``mode='slide'`` with
            ``crop_size`` (int or square ``(h, w)``); ``anomaly_scores`` (list of score names for
            :func:`eomt_mm.anomaly.scores.compute_anomaly_scores`) adds
            ``data_sample.anomaly_scores`` at ``ori_shape``. Whole mode scores the final mask
            logits after bringing them to ``ori_shape`` (upsample to the padded input, cut the
            padding, undo the flip, resize). Slide mode cannot stitch mask logits (each window
            has its own queries), so each window is scored from its mask logits upsampled to
            its footprint on a label-scale canvas, and the score maps are stitched there.
        lora_config: LoRA config block (see :func:`eomt_mm.lora.apply_lora`); applied at the end
            of the constructor so trainability is settled before DDP wraps the model.
        outlier_loss: Optional outlier-exposure loss config built from mmseg ``MODELS``, e.g.
            ``dict(type='RbALoss')``. It is called as ``loss(class_logits [B, Q, K + 1],
            mask_logits [B, Q, H, W], target [B, H, W])`` on the final prediction with the mask
            logits bilinearly upsampled to the ground-truth size; the target holds the loss's
            ``outlier_label`` (1 for RbALoss) at pasted-outlier pixels, 0 at the other labelled
            pixels and its ``ignore_index`` (255) elsewhere. Its value enters the loss dict as
            the loss's ``loss_name`` (``'loss_rba'`` for RbALoss). None (default) = plain
            closed-set training, unchanged.
        outlier_label: ``gt_sem_seg`` value of pasted outlier pixels (the ``paste_label`` of
            :class:`eomt_mm.datasets.transforms.PasteOutliers`). Only read when
            ``outlier_loss`` is set; those pixels are then ignored by the closed-set set loss.
        checkpoint_blocks: Non-reentrant activation checkpointing of leading backbone blocks
            during training (``torch.utils.checkpoint.checkpoint(use_reentrant=False)``): an
            int ``n`` = the first ``n`` blocks (0, the default, = off; at most the backbone
            depth), or ``'frozen'`` = every block before the first query block. A checkpointed
            block keeps only its input for backward and recomputes the rest, trading about one
            extra block forward for its activations. Never used at inference or when autograd
            is off. Non-reentrant because reentrant checkpointing gives the LoRA matrices of a
            frozen base no gradients; the default RNG state is restored for the recomputation,
            so LoRA dropout redraws the same masks and gradients equal the plain run's.
            (No checkpointing is needed to save memory where nothing upstream trains: when
            the patch embedding and the leading blocks are all frozen and carry no LoRA, no
            tensor there requires grad and autograd records no graph for them at all.)
        checkpoint_decoder: Non-reentrant activation checkpointing of every decoder prediction
            (upscaler, mask and class heads) during training. With masked attention the decoder
            predicts once per query block plus once at the end (4 times for EoMT-B), and each
            upscaler pass keeps full-width feature maps at 1/4 of the input resolution for
            backward (about 375 MiB per pass for ViT-B at 640): at 640 those are about half
            of the training step's activations. Checkpointing keeps only the tokens and the
            logits and recomputes the upscaler in backward, about one ViT-B block of compute
            per prediction. Gradients are unchanged (the decoder has no randomness).
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 backbone: dict,
                 decoder: dict,
                 data_preprocessor: OptConfigType = None,
                 train_cfg: OptConfigType = None,
                 test_cfg: OptConfigType = None,
                 lora_config: Optional[dict] = None,
                 outlier_loss: Optional[dict] = None,
                 outlier_label: int = 254,
                 checkpoint_blocks: Union[int, str] = 0,
                 checkpoint_decoder: bool = False,
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        for attr in ('embed', 'forward_block', 'final_norm', 'num_layers', 'num_prefix_tokens',
                     'embed_dims', 'patch_size'):
            if not hasattr(self.backbone, attr):
                raise TypeError(f'EoMT: backbone {type(self.backbone).__name__} lacks {attr!r}; '
                                'EoMT needs the block-level API of DINOv2')
        decoder = dict(decoder)
        for key in ('embed_dims', 'patch_size'):
            own = int(getattr(self.backbone, key))
            if decoder.setdefault(key, own) != own:
                raise ValueError(f'EoMT: decoder {key}={decoder[key]} does not match the '
                                 f'backbone {key}={own}')
        self.decoder = MODELS.build(decoder)
        if self.decoder.num_blocks > self.backbone.num_layers:
            raise ValueError(
                f'EoMT: decoder num_blocks={self.decoder.num_blocks} is larger than the '
                f'backbone depth ({self.backbone.num_layers} layers); queries must enter before '
                f'one of the existing blocks')
        self.checkpoint_blocks = self._resolve_checkpoint_blocks(checkpoint_blocks)
        if not isinstance(checkpoint_decoder, bool):
            raise ValueError(f'EoMT checkpoint_decoder must be True or False, got '
                             f'{checkpoint_decoder!r}')
        self.checkpoint_decoder = checkpoint_decoder
        self.train_cfg = train_cfg
        self.test_cfg = dict(test_cfg or dict(mode='whole'))
        self._check_test_cfg(self.test_cfg)
        crop = self.test_cfg.get('crop_size')
        if self.test_cfg.get('mode') == 'slide' and (
                crop if isinstance(crop, int) else crop[0]) % self.backbone.patch_size:
            raise ValueError(f'EoMT test_cfg.crop_size {crop} must be a multiple of the patch '
                             f'size {self.backbone.patch_size}')
        # Attributes mmseg code reads from segmentors: resize mode of the outputs, and the number
        # of output channels (SegTTAModel.merge_preds).
        self.align_corners = False
        self.num_classes = self.decoder.num_classes
        self.out_channels = self.decoder.num_classes
        self.outlier_label = outlier_label
        self.outlier_loss = None
        if outlier_loss is not None:
            self.outlier_loss = MODELS.build(outlier_loss)
            self._check_outlier_labels()
        if lora_config is not None:
            # Imported here: the LoRA package imports model code, not the other way round.
            from eomt_mm.lora import apply_lora
            apply_lora(self, lora_config)

    def _resolve_checkpoint_blocks(self, value: Union[int, str]) -> int:
        """Number of leading blocks to checkpoint from the ``checkpoint_blocks`` argument."""
        depth = self.backbone.num_layers
        if value == 'frozen':
            return depth - self.decoder.num_blocks
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= depth:
            raise ValueError(f"EoMT checkpoint_blocks must be 'frozen' or an int in "
                             f'[0, {depth}] (the backbone depth), got {value!r}')
        return value

    def _block(self, index: int, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """``backbone.forward_block``, checkpointed for the first ``checkpoint_blocks`` blocks
        while training with autograd on."""
        if (index < self.checkpoint_blocks and self.training and torch.is_grad_enabled()):
            return checkpoint(self.backbone.forward_block, index, x, attn_mask,
                              use_reentrant=False)
        return self.backbone.forward_block(index, x, attn_mask)

    def _predict(self, tokens: Tensor, grid: Tuple[int, int],
                 num_prefix: int) -> Tuple[Tensor, Tensor]:
        """``decoder.predict`` on final-normalised tokens, checkpointed when
        ``checkpoint_decoder`` is set while training with autograd on."""
        if self.checkpoint_decoder and self.training and torch.is_grad_enabled():
            return checkpoint(self.decoder.predict, tokens, grid, num_prefix,
                              use_reentrant=False)
        return self.decoder.predict(tokens, grid, num_prefix)

    def _check_outlier_labels(self) -> None:
        """The pasted-outlier label must be distinguishable from classes and ignore."""
        ignore = self.decoder.loss_module.ignore_index
        label = self.outlier_label
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= 255:
            raise ValueError(f'EoMT outlier_label must be an int in [0, 255] (the PasteOutliers '
                             f'paste_label), got {label!r}')
        if label < self.num_classes or label == ignore:
            raise ValueError(
                f'EoMT outlier_label={label} collides with a class id (0..{self.num_classes - 1})'
                f' or the set-loss ignore_index={ignore}; use a free value such as 254 and the '
                'same value as PasteOutliers paste_label')
        target_out = getattr(self.outlier_loss, 'outlier_label', 1)
        target_ignore = getattr(self.outlier_loss, 'ignore_index', 255)
        if len({0, target_out, target_ignore}) != 3:
            raise ValueError(
                f'EoMT outlier_loss uses outlier_label={target_out} and ignore_index='
                f'{target_ignore}; both must differ from each other and from 0, the inlier '
                'value of the outlier target')

    @staticmethod
    def _check_test_cfg(cfg: dict) -> None:
        mode = cfg.get('mode', 'whole')
        if mode not in ('whole', 'slide'):
            raise ValueError(f"EoMT test_cfg.mode must be 'whole' or 'slide', got {mode!r}")
        if mode == 'slide':
            if 'crop_size' not in cfg:
                raise ValueError("EoMT test_cfg.mode='slide' needs crop_size")
            crop = cfg['crop_size']
            crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
            if len(crop) != 2 or crop[0] != crop[1] or crop[0] <= 0:
                raise ValueError('EoMT slide inference uses square windows (reference window '
                                 f'placement); crop_size must be an int or (s, s), got {crop}')
        names = cfg.get('anomaly_scores')
        if names is not None and (isinstance(names, str) or not all(
                isinstance(n, str) for n in names)):
            raise ValueError('EoMT test_cfg.anomaly_scores must be a list of score names, got '
                             f'{names!r}')

    def get_layer_depth(self, param_name: str) -> Tuple[int, int]:
        """Layer depth for mmpretrain's ``LearningRateDecayOptimWrapperConstructor``.

        That constructor asks the model it is given (this segmentor); backbone parameters get the
        backbone's depths (reference layer-wise decay), everything else the full lr.
        """
        return self.backbone.get_layer_depth(param_name, prefix='backbone.')

    # ------------------------------------------------------------------ network
    def _check_input(self, inputs: Tensor) -> None:
        if inputs.ndim != 4:
            raise ValueError(f'EoMT expects images [B, C, H, W], got shape {tuple(inputs.shape)}')
        patch = self.backbone.patch_size
        height, width = inputs.shape[-2:]
        if height % patch or width % patch:
            raise ValueError(
                f'EoMT input {height}x{width} is not a multiple of the patch size {patch}: set '
                f'size_divisor={patch} (or a multiple-of-{patch} crop) in the data preprocessor, '
                f"or use test_cfg mode='slide' with a crop_size multiple of {patch}")

    def run_network(self, inputs: Tensor, masked_attn: bool) -> PredList:
        """Run the network and return every prediction.

        Args:
            inputs: Normalised images ``[B, C, H, W]`` (sides multiples of the patch size).
            masked_attn: Make the L2 intermediate predictions and use masked attention with the
                keep probabilities ``decoder.attn_mask_probs`` (training); False = one prediction
                with plain attention (inference).

        Returns:
            ``(mask_logits_per_layer, class_logits_per_layer)``: L2 + 1 entries with masked
            attention, else 1; each ``[B, Q, H/4, W/4]`` (patch 16) and ``[B, Q, K + 1]``.
        """
        self._check_input(inputs)
        backbone, decoder = self.backbone, self.decoder
        num_layers, num_blocks = backbone.num_layers, decoder.num_blocks
        num_prefix = backbone.num_prefix_tokens
        x, grid = backbone.embed(inputs)
        first_query_block = num_layers - num_blocks
        for i in range(first_query_block):
            x = self._block(i, x)
        x = torch.cat([decoder.q.weight[None].expand(x.shape[0], -1, -1), x], dim=1)
        mask_logits_per_layer, class_logits_per_layer = [], []
        for j in range(num_blocks):
            attn_mask = None
            if masked_attn:
                mask_logits, class_logits = self._predict(backbone.final_norm(x), grid,
                                                          num_prefix)
                mask_logits_per_layer.append(mask_logits)
                class_logits_per_layer.append(class_logits)
                attn_mask = decoder.build_attn_mask(mask_logits, grid, num_prefix, j)
            x = self._block(first_query_block + j, x, attn_mask)
        mask_logits, class_logits = self._predict(backbone.final_norm(x), grid, num_prefix)
        mask_logits_per_layer.append(mask_logits)
        class_logits_per_layer.append(class_logits)
        return mask_logits_per_layer, class_logits_per_layer

    def forward_logits(self, inputs: Tensor) -> Tuple[Tensor, Tensor]:
        """Raw final prediction with masked attention off, for analysis tools.

        Args:
            inputs: Normalised images ``[B, C, H, W]``.

        Returns:
            ``(mask_logits [B, Q, H/4, W/4], class_logits [B, Q, K + 1])`` (patch 16).
        """
        mask_logits, class_logits = self.run_network(inputs, masked_attn=False)
        return mask_logits[-1], class_logits[-1]

    @staticmethod
    def class_scores(mask_logits: Tensor, class_logits: Tensor) -> Tensor:
        """``S_k = sum_q softmax(class_q)[k] * sigmoid(mask_q)`` over the K real classes.

        Args:
            mask_logits: ``[B, Q, H, W]`` (already at the wanted resolution).
            class_logits: ``[B, Q, K + 1]``.

        Returns:
            ``[B, K, H, W]``.
        """
        return torch.einsum('bqk,bqhw->bkhw', class_logits.softmax(-1)[..., :-1],
                            mask_logits.sigmoid())

    # ------------------------------------------------------------ mmseg modes
    def extract_feat(self, inputs: Tensor) -> List[Tensor]:
        """Final-normalised token sequence ``[B, Q + P + h*w, D]`` (masked attention off)."""
        self._check_input(inputs)
        backbone, decoder = self.backbone, self.decoder
        x, _ = backbone.embed(inputs)
        first_query_block = backbone.num_layers - decoder.num_blocks
        for i in range(backbone.num_layers):
            if i == first_query_block:
                x = torch.cat([decoder.q.weight[None].expand(x.shape[0], -1, -1), x], dim=1)
            x = self._block(i, x)
        return [backbone.final_norm(x)]

    def _dense_outputs(self, inputs: Tensor, with_anomaly: bool) -> Dict[str, Tensor]:
        """Outputs of one pass over ``inputs``.

        Args:
            inputs: Normalised images (or windows).
            with_anomaly: Also return the raw final prediction, ``'mask_logits'``
                ``[B, Q, H/4, W/4]`` (patch 16, network resolution) and ``'class_logits'``
                ``[B, Q, K + 1]``, so that anomaly scores are computed after the mask logits
                are brought to the label resolution (:meth:`postprocess_result`).

        Returns:
            ``'seg_logits'`` [B, K, H, W] at the resolution of ``inputs``, plus the above.
        """
        mask_logits, class_logits = self.forward_logits(inputs)
        upsampled = F.interpolate(mask_logits, size=inputs.shape[-2:], mode='bilinear',
                                  align_corners=False)
        outputs = {'seg_logits': self.class_scores(upsampled, class_logits)}
        if with_anomaly:
            outputs.update(mask_logits=mask_logits, class_logits=class_logits)
        return outputs

    def _anomaly_scores(self, class_logits: Tensor, mask_logits: Tensor) -> Dict[str, Tensor]:
        """``test_cfg.anomaly_scores`` via :func:`eomt_mm.anomaly.scores.compute_anomaly_scores`."""
        # Imported here: the anomaly package is optional for plain segmentation.
        from eomt_mm.anomaly.scores import compute_anomaly_scores
        names = list(self.test_cfg['anomaly_scores'])
        scores = compute_anomaly_scores(class_logits.float(), mask_logits.float(), names)
        missing = [n for n in names if n not in scores]
        if missing:
            raise KeyError(f'compute_anomaly_scores returned no {missing}')
        return {name: scores[name].float() for name in names}

    def _window_layout(self, height: int, width: int) -> _SlideLayout:
        """Reference window placement (tue-mps/eomt ``window_imgs_semantic``).

        Resize so the short side equals the crop, cover the long side with
        ``ceil(long / crop)`` square windows spread evenly.
        """
        crop = self.test_cfg['crop_size']
        crop = crop if isinstance(crop, int) else int(crop[0])
        factor = max(crop / height, crop / width)
        new_h, new_w = round(height * factor), round(width * factor)
        along_h = new_h > new_w
        long_side = new_h if along_h else new_w
        num_crops = math.ceil(long_side / crop)
        overlap = num_crops * crop - long_side
        step = crop - (overlap / (num_crops - 1) if overlap > 0 else 0)
        starts = tuple(int(j * step) for j in range(num_crops))
        return _SlideLayout(crop, (height, width), (new_h, new_w), along_h, starts)

    def _slide_outputs(self, inputs: Tensor, with_anomaly: bool) -> Dict:
        """Reference sliding-window inference for the class scores.

        Windows of :meth:`_window_layout`; the per-pixel class scores of the windows are
        averaged where they overlap and resized back to the input size. With
        ``with_anomaly`` the raw per-window predictions (``'window_mask_logits'``
        ``[n * B, Q, h, w]``, ``'window_class_logits'``, window ``j`` of image ``i`` at
        ``j * B + i``) and the ``'layout'`` are returned as well: the anomaly maps are made
        from them at label resolution in :meth:`_slide_anomaly_scores`.
        """
        height, width = inputs.shape[-2:]
        layout = self._window_layout(height, width)
        crop, (new_h, new_w) = layout.crop, layout.resized
        resized = inputs
        if (new_h, new_w) != (height, width):
            # antialias matches the reference's PIL bilinear resize when shrinking.
            resized = F.interpolate(inputs, size=(new_h, new_w), mode='bilinear',
                                    align_corners=False, antialias=True)
        windows = [resized[:, :, s:s + crop] if layout.along_h else resized[..., s:s + crop]
                   for s in layout.starts]
        batch = inputs.shape[0]
        outputs = self._dense_outputs(torch.cat(windows, dim=0), with_anomaly)
        value = outputs.pop('seg_logits')
        total = value.new_zeros(batch, value.shape[1], new_h, new_w)
        count = value.new_zeros(1, 1, new_h, new_w)
        for j, s in enumerate(layout.starts):
            part = value[j * batch:(j + 1) * batch]
            if layout.along_h:
                total[:, :, s:s + crop] += part
                count[:, :, s:s + crop] += 1
            else:
                total[..., s:s + crop] += part
                count[..., s:s + crop] += 1
        seg_logits = total / count
        if (new_h, new_w) != (height, width):
            seg_logits = F.interpolate(seg_logits, size=(height, width), mode='bilinear',
                                       align_corners=False)
        merged = {'seg_logits': seg_logits}
        if with_anomaly:
            merged.update(window_mask_logits=outputs['mask_logits'],
                          window_class_logits=outputs['class_logits'], layout=layout)
        return merged

    def _inference_outputs(self, inputs: Tensor, with_anomaly: bool = False) -> Dict:
        with_anomaly = with_anomaly and bool(self.test_cfg.get('anomaly_scores'))
        if self.test_cfg.get('mode', 'whole') == 'slide':
            return self._slide_outputs(inputs, with_anomaly)
        return self._dense_outputs(inputs, with_anomaly)

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Per-pixel class scores ``[B, K, H, W]`` at the input resolution (test_cfg mode)."""
        return self._inference_outputs(inputs, with_anomaly=False)['seg_logits']

    def loss(self, inputs: Tensor, data_samples: SampleList) -> dict:
        """Set losses of all predictions (masked attention per ``decoder.masked_attn_enabled``).

        With ``outlier_loss`` set, pixels labelled ``outlier_label`` are ignored by the set loss
        and the outlier loss is added on the final prediction (see the class docstring).

        Args:
            inputs: Normalised images ``[B, C, H, W]``.
            data_samples: Samples with ``gt_sem_seg``.

        Returns:
            Loss dict (see :meth:`EoMTDecoder.loss`), plus the outlier loss if configured.
        """
        masked = self.training and self.decoder.masked_attn_enabled
        mask_logits, class_logits = self.run_network(inputs, masked_attn=masked)
        if self.outlier_loss is None:
            return self.decoder.loss(mask_logits, class_logits, data_samples)
        gt = self._stack_gt(data_samples)
        ignore = self.decoder.loss_module.ignore_index
        outlier = gt == self.outlier_label
        closed_samples = self._with_gt(data_samples, gt.masked_fill(outlier, ignore))
        losses = self.decoder.loss(mask_logits, class_logits, closed_samples)

        target_ignore = getattr(self.outlier_loss, 'ignore_index', 255)
        target = torch.full_like(gt, target_ignore)
        target[(gt != ignore) & ~outlier] = 0
        target[outlier] = getattr(self.outlier_loss, 'outlier_label', 1)
        name = getattr(self.outlier_loss, 'loss_name', 'loss_outlier')
        if name in losses:
            raise KeyError(f'EoMT outlier_loss name {name!r} collides with a set-loss key')
        # float32 outside autocast: the RbA score is a sum of K saturating tanh terms whose
        # hinge margins (0 and 5) half precision would blur.
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            masks = F.interpolate(mask_logits[-1].float(), size=gt.shape[-2:],
                                  mode='bilinear', align_corners=False)
            losses[name] = self.outlier_loss(class_logits[-1].float(), masks, target)
        return losses

    @staticmethod
    def _stack_gt(data_samples: SampleList) -> Tensor:
        """``[B, H, W]`` labels; the data preprocessor pads them to one size."""
        labels = []
        for sample in data_samples:
            if 'gt_sem_seg' not in sample:
                raise KeyError('EoMT loss needs data_samples with gt_sem_seg')
            labels.append(sample.gt_sem_seg.data.reshape(sample.gt_sem_seg.data.shape[-2:]))
        shapes = {tuple(x.shape) for x in labels}
        if len(shapes) != 1:
            raise ValueError(f'EoMT outlier loss needs gt_sem_seg maps of one size (the data '
                             f'preprocessor pads them), got {sorted(shapes)}')
        return torch.stack(labels)

    @staticmethod
    def _with_gt(data_samples: SampleList, gt: Tensor) -> SampleList:
        """New samples (same metainfo) holding ``gt``: the caller's samples stay untouched."""
        from mmseg.structures import SegDataSample
        out = []
        for sample, labels in zip(data_samples, gt):
            new = SegDataSample(metainfo=sample.metainfo)
            new.gt_sem_seg = PixelData(data=labels[None], metainfo=sample.gt_sem_seg.metainfo)
            out.append(new)
        return out

    def predict(self, inputs: Tensor, data_samples: Optional[SampleList] = None) -> SampleList:
        """Semantic prediction with masked attention off.

        Args:
            inputs: Normalised images ``[B, C, H, W]``.
            data_samples: Samples whose metainfo gives ``ori_shape``, padding and flip.

        Returns:
            The samples with ``seg_logits`` (``[K, H, W]`` class scores at ``ori_shape``),
            ``pred_sem_seg`` and, if configured, ``anomaly_scores`` (one ``[1, H, W]`` float32
            field per score name).
        """
        outputs = self._inference_outputs(inputs, with_anomaly=True)
        return self.postprocess_result(outputs, data_samples)

    def _forward(self, inputs: Tensor, data_samples: OptConfigType = None) -> PredList:
        """Tensor mode: the network's raw ``(mask_logits_per_layer, class_logits_per_layer)``."""
        masked = self.training and self.decoder.masked_attn_enabled
        return self.run_network(inputs, masked_attn=masked)

    # mmseg's BaseSegmentor.postprocess_result undoes padding / flip / resize for the class
    # scores only and treats a single channel as a sigmoid logit; EoMT scores are already
    # probabilities and the anomaly maps need their own path, so it is redone here.
    def postprocess_result(self, outputs: Dict | Tensor,
                           data_samples: Optional[SampleList] = None) -> SampleList:
        """Restore outputs to each image's original geometry and fill the data samples.

        Anomaly scores follow the pooled protocol (anomaly.md): they are computed in float32
        from mask logits brought to the label (``ori_shape``) resolution, never by resizing
        score maps made at network resolution (the scores are non-linear in the mask logits).

        * whole mode: per image, the mask logits are bilinearly upsampled to the (padded)
          network input, the padding is cut off and the flip undone, they are bilinearly
          resized to ``ori_shape``, then scored. Going through the input grid is the
          Mask2Former / RbA ``sem_seg_postprocess`` convention and cuts the padding at a
          resolution where it is a whole number of pixels. One image's ``Q x H x W`` float32
          logits are alive at a time.
        * slide mode: see :meth:`_slide_anomaly_scores`.

        Args:
            outputs: From :meth:`_inference_outputs`: ``'seg_logits'`` [B, K, H, W] at the
                (padded) input resolution, plus for anomaly scores either ``'mask_logits'``
                [B, Q, h, w] + ``'class_logits'`` [B, Q, K + 1] (whole mode) or
                ``'window_mask_logits'``, ``'window_class_logits'`` and ``'layout'`` (slide
                mode); or the class-score tensor alone.
            data_samples: Samples with metainfo (``ori_shape``, ``padding_size`` or
                ``img_padding_size``, ``flip``, ``flip_direction``); None returns new samples
                without geometry changes.

        Returns:
            The filled samples.
        """
        from mmseg.structures import SegDataSample
        if isinstance(outputs, Tensor):
            outputs = {'seg_logits': outputs}
        seg_all = outputs['seg_logits']
        batch = seg_all.shape[0]
        input_hw = tuple(seg_all.shape[-2:])
        if data_samples is None:
            data_samples = [SegDataSample() for _ in range(batch)]
            metas = [None] * batch
        else:
            metas = [sample.metainfo for sample in data_samples]
        for i, (sample, meta) in enumerate(zip(data_samples, metas)):
            seg_logits = self._restore_geometry(seg_all[i:i + 1], meta)[0]
            sample.set_data({
                'seg_logits': PixelData(data=seg_logits),
                'pred_sem_seg': PixelData(data=seg_logits.argmax(dim=0, keepdim=True)),
            })
            scores = None
            # Under AMP, autocast would run the interpolation and the score einsums in half
            # precision; the protocol wants float32 (RbA saturates and ties break FPR95).
            with torch.autocast(device_type=seg_all.device.type, enabled=False):
                if 'mask_logits' in outputs:
                    masks = F.interpolate(outputs['mask_logits'][i:i + 1].float(),
                                          size=input_hw, mode='bilinear', align_corners=False)
                    masks = self._restore_geometry(masks, meta)
                    scores = self._anomaly_scores(outputs['class_logits'][i:i + 1], masks)
                    del masks
                elif 'window_mask_logits' in outputs:
                    scores = self._slide_anomaly_scores(outputs, i, batch, meta)
            if scores is not None:
                sample.anomaly_scores = PixelData(**scores)
        return data_samples

    @staticmethod
    def _geometry(meta: Optional[dict], input_hw: Tuple[int, int]) -> Tuple:
        """``(left, right, top, bottom)`` padding, flip direction or None, label size."""
        if meta is None:
            return (0, 0, 0, 0), None, tuple(input_hw)
        pad = tuple(int(p) for p in meta.get('img_padding_size',
                                             meta.get('padding_size', [0, 0, 0, 0])))
        flip = None
        if meta.get('flip', False):
            flip = meta.get('flip_direction')
            if flip not in ('horizontal', 'vertical'):
                raise ValueError(f'unknown flip_direction {flip!r} in img_meta')
        left, right, top, bottom = pad
        content = (input_hw[0] - top - bottom, input_hw[1] - left - right)
        out = tuple(meta['ori_shape'][:2]) if 'ori_shape' in meta else content
        return pad, flip, out

    def _restore_geometry(self, value: Tensor, meta: Optional[dict]) -> Tensor:
        """``[1, C, H, W]`` -> ``[1, C, h, w]``: remove padding, undo flip, resize to ori_shape."""
        (left, right, top, bottom), flip, out = self._geometry(meta, value.shape[-2:])
        height, width = value.shape[-2:]
        value = value[..., top:height - bottom, left:width - right]
        if flip == 'horizontal':
            value = value.flip(dims=(3, ))
        elif flip == 'vertical':
            value = value.flip(dims=(2, ))
        if tuple(value.shape[-2:]) != out:
            value = F.interpolate(value, size=out, mode='bilinear',
                                  align_corners=self.align_corners)
        return value

    def _slide_anomaly_scores(self, outputs: Dict, index: int, batch: int,
                              meta: Optional[dict]) -> Dict[str, Tensor]:
        """Anomaly maps of image ``index`` in slide mode, at its label resolution.

        Each window has its own query set, so mask logits of different windows cannot be
        averaged or stitched (query ``q`` of one window is unrelated to query ``q`` of the
        next); only score maps can be. To stay as close as possible to the protocol (score
        after upsampling the mask logits to label resolution), every window's scores are
        computed from its mask logits bilinearly upsampled straight to the window's footprint
        on a *label-scale canvas*: the whole (padded) input scaled by ``ori / content`` per
        axis, so that after cutting the (scaled) padding it has the label's size. Window edges
        are rounded to whole canvas pixels. The window score maps are averaged where windows
        overlap, the padding is cut, the flip undone, and a final resize to ``ori_shape`` only
        absorbs the rounding of the canvas (at most a pixel per side). No score map is ever
        resized from network resolution.

        Args:
            outputs: Slide outputs of :meth:`_slide_outputs` (with anomaly entries).
            index: Image index in the batch.
            batch: Batch size (window ``j`` of image ``i`` is at ``j * batch + i``).
            meta: The image's metainfo or None (canvas = input size).

        Returns:
            name -> ``[1, H, W]`` float32 at ``ori_shape``.
        """
        layout: _SlideLayout = outputs['layout']
        (left, right, top, bottom), flip, out = self._geometry(meta, layout.input)
        height, width = layout.input
        scale_h = out[0] / (height - top - bottom)
        scale_w = out[1] / (width - left - right)
        canvas = (round(height * scale_h), round(width * scale_w))
        new_h, new_w = layout.resized
        # Canvas pixels per resized-input pixel along the windowed (long) axis.
        axis_scale = canvas[0] / new_h if layout.along_h else canvas[1] / new_w
        total: Dict[str, Tensor] = {}
        count = torch.zeros(canvas, device=outputs['seg_logits'].device)
        for j, s in enumerate(layout.starts):
            lo, hi = round(s * axis_scale), round((s + layout.crop) * axis_scale)
            size = (hi - lo, canvas[1]) if layout.along_h else (canvas[0], hi - lo)
            k = j * batch + index
            masks = F.interpolate(outputs['window_mask_logits'][k:k + 1].float(), size=size,
                                  mode='bilinear', align_corners=False)
            scores = self._anomaly_scores(outputs['window_class_logits'][k:k + 1], masks)
            del masks
            region = (slice(lo, hi), slice(None)) if layout.along_h else (slice(None),
                                                                          slice(lo, hi))
            count[region] += 1
            for name, value in scores.items():
                if name not in total:
                    total[name] = value.new_zeros(1, *canvas)
                total[name][(slice(None), ) + region] += value
        result = {}
        pad = (round(left * scale_w), round(right * scale_w), round(top * scale_h),
               round(bottom * scale_h))
        for name, value in total.items():
            value = (value / count)[None]
            value = self._restore_geometry(
                value, dict(padding_size=pad, flip=flip is not None, flip_direction=flip,
                            ori_shape=out))
            result[name] = value[0]
        return result
