"""EoMT ("Your ViT is Secretly an Image Segmentation Model", CVPR 2025) as an mmseg segmentor.

Call graph (the network follows tue-mps/eomt ``models/eomt.py``)::

    loss(inputs, samples)                       predict(inputs, samples)
      run_network(masked_attn=training &&         inference(inputs) -> InferenceOutputs
                  decoder.masked_attn_enabled)       whole: _infer(inputs)
      decoder.loss(predictions, samples)             slide: window_layout -> crop_windows
                                                            -> _infer(windows) -> stitch_windows
    _forward(inputs)  (tensor mode)                _infer: run_network(masked_attn=False)
      run_network(...)                                     -> upsample -> decoder.semantic_map
                                                   postprocess_result(outputs, samples)
    extract_feat(inputs)                             restore_geometry -> seg_logits, pred_sem_seg
      _run_blocks -> backbone.final_norm

    _run_blocks(inputs, masked_attn)  (the one block loop)
      x, (h, w) = backbone.embed(img)                  # [CLS, registers, patches]
      for block i:
          if i == first query block: x = decoder.prepend_queries(x)
          if i >= first query block and masked_attn:
              intermediate prediction on final_norm(x) -> decoder.build_attn_mask
          x = backbone.forward_block(i, x, mask)       # checkpointed if configured

Normalisation is the data preprocessor's job only. Geometry (windows, padding, flip, resize) is
in :mod:`eomt_mm.models.utils.geometry`; anomaly scores and outlier exposure are added by the
``AnomalyEoMT`` subclass of the anomaly package, which this module does not know.
"""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import OptConfigType, OptMultiConfig, SampleList
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..utils.geometry import (crop_windows, image_geometry, restore_geometry, stitch_windows,
                              window_layout)
from .structures import EoMTPredictions, InferenceOutputs

_BACKBONE_API = ('embed', 'forward_block', 'final_norm', 'num_layers', 'num_prefix_tokens',
                 'embed_dims', 'patch_size')


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
        test_cfg: ``mode='whole'`` (default) or ``mode='slide'`` with ``crop_size`` (int or
            square ``(s, s)``, a multiple of the patch size).
        lora_config: LoRA config block, applied at the end of the constructor (so trainability is
            settled before DDP wraps the model) by the registered ``WithLoRA`` build step of
            ``eomt_mm.lora``, looked up by name like any other registered component: the model
            code does not import the LoRA package.
        checkpoint_blocks: Non-reentrant activation checkpointing of leading backbone blocks
            during training: an int ``n`` = the first ``n`` blocks (0, the default, = off; at
            most the backbone depth), or ``'frozen'`` = every block before the first query
            block (``torch.utils.checkpoint.checkpoint(use_reentrant=False)``). A checkpointed
            block keeps only its input for backward and recomputes the rest. Never used at
            inference or when autograd is off. Non-reentrant because reentrant checkpointing
            gives the LoRA matrices of a frozen base no gradients; the
            RNG state is restored for the recomputation, so LoRA dropout redraws the same masks.
            (Where nothing upstream trains, autograd records no graph there at all and
            checkpointing saves nothing.)
        checkpoint_decoder: Non-reentrant activation checkpointing of every decoder prediction
            (upscaler, mask and class heads) during training. With masked attention the decoder
            predicts once per query block plus once at the end, and each upscaler pass keeps
            full-width maps at 1/4 of the input resolution for backward; checkpointing keeps
            only the tokens and the logits and recomputes the upscaler in backward. Gradients
            are unchanged (the decoder has no randomness).
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 backbone: dict,
                 decoder: dict,
                 data_preprocessor: OptConfigType = None,
                 train_cfg: OptConfigType = None,
                 test_cfg: OptConfigType = None,
                 lora_config: Optional[dict] = None,
                 checkpoint_blocks: Union[int, str] = 0,
                 checkpoint_decoder: bool = False,
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        for attr in _BACKBONE_API:
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
        self.first_query_block = self.backbone.num_layers - self.decoder.num_blocks
        self.checkpoint_blocks = self._resolve_checkpoint_blocks(checkpoint_blocks)
        if not isinstance(checkpoint_decoder, bool):
            raise ValueError(f'EoMT checkpoint_decoder must be True or False, got '
                             f'{checkpoint_decoder!r}')
        self.checkpoint_decoder = checkpoint_decoder
        self.train_cfg = train_cfg
        self.test_cfg = dict(test_cfg or dict(mode='whole'))
        self._check_test_cfg(self.test_cfg)
        # Attributes mmseg code reads from segmentors: resize mode of the outputs, and the number
        # of output channels (SegTTAModel.merge_preds).
        self.align_corners = False
        self.num_classes = self.decoder.num_classes
        self.out_channels = self.decoder.num_classes
        if lora_config is not None:
            MODELS.build(dict(type='WithLoRA', model=self, lora_config=lora_config))

    def _resolve_checkpoint_blocks(self, value: Union[int, str]) -> int:
        """Number of leading blocks to checkpoint from the ``checkpoint_blocks`` argument."""
        depth = self.backbone.num_layers
        if value == 'frozen':
            return self.first_query_block
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= depth:
            raise ValueError(f"EoMT checkpoint_blocks must be 'frozen' or an int in "
                             f'[0, {depth}] (the backbone depth), got {value!r}')
        return value

    def _check_test_cfg(self, cfg: dict) -> None:
        """Validate ``test_cfg`` (mode, square crop that is a multiple of the patch size)."""
        mode = cfg.get('mode', 'whole')
        if mode not in ('whole', 'slide'):
            raise ValueError(f"EoMT test_cfg.mode must be 'whole' or 'slide', got {mode!r}")
        if 'anomaly_scores' in cfg and not self._accepts_anomaly_scores:
            raise ValueError("EoMT test_cfg.anomaly_scores needs the anomaly-enabled segmentor: "
                             "set model type='AnomalyEoMT' (same weights and state-dict keys)")
        if mode == 'slide':
            if 'crop_size' not in cfg:
                raise ValueError("EoMT test_cfg.mode='slide' needs crop_size")
            crop = cfg['crop_size']
            crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
            if len(crop) != 2 or crop[0] != crop[1] or crop[0] <= 0:
                raise ValueError('EoMT slide inference uses square windows (reference window '
                                 f'placement); crop_size must be an int or (s, s), got {crop}')
            if crop[0] % self.backbone.patch_size:
                raise ValueError(f'EoMT test_cfg.crop_size {crop[0]} must be a multiple of the '
                                 f'patch size {self.backbone.patch_size}')

    #: Subclasses that add anomaly scores set this (plain EoMT refuses the test_cfg key).
    _accepts_anomaly_scores = False

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
            # mmseg's SegDataPreProcessor pads with `size` / `size_divisor` only in training;
            # at test time it reads its own `test_cfg`: quote the key that works in this mode.
            if self.training:
                fix = (f'set model.data_preprocessor.size to a crop whose sides are multiples of '
                       f'{patch} (or size_divisor={patch})')
            else:
                fix = (f'set model.data_preprocessor.test_cfg=dict(size_divisor={patch}), or '
                       f"model.test_cfg=dict(mode='slide', crop_size=<a multiple of {patch}>)")
            raise ValueError(f'EoMT input {height}x{width} is not a multiple of the patch size '
                             f'{patch}: {fix}')

    def _use_checkpoint(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _block(self, index: int, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """``backbone.forward_block``, checkpointed for the first ``checkpoint_blocks`` blocks."""
        if index < self.checkpoint_blocks and self._use_checkpoint():
            return checkpoint(self.backbone.forward_block, index, x, attn_mask,
                              use_reentrant=False)
        return self.backbone.forward_block(index, x, attn_mask)

    def _predict(self, tokens: Tensor, grid: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """``decoder.predict`` on final-normalised tokens (checkpointed if configured)."""
        tokens = self.backbone.final_norm(tokens)
        num_prefix = self.backbone.num_prefix_tokens
        if self.checkpoint_decoder and self._use_checkpoint():
            return checkpoint(self.decoder.predict, tokens, grid, num_prefix,
                              use_reentrant=False)
        return self.decoder.predict(tokens, grid, num_prefix)

    def _run_blocks(self, inputs: Tensor,
                    masked_attn: bool) -> Tuple[Tensor, Tuple[int, int], EoMTPredictions]:
        """The one block loop: tokens after the last block and the intermediate predictions."""
        self._check_input(inputs)
        x, grid = self.backbone.embed(inputs)
        first = self.first_query_block
        predictions = EoMTPredictions([], [])
        for i in range(self.backbone.num_layers):
            attn_mask = None
            if i == first:
                x = self.decoder.prepend_queries(x)
            if i >= first and masked_attn:
                mask_logits, class_logits = self._predict(x, grid)
                predictions.mask_logits.append(mask_logits)
                predictions.class_logits.append(class_logits)
                attn_mask = self.decoder.build_attn_mask(
                    mask_logits, grid, self.backbone.num_prefix_tokens, i - first)
            x = self._block(i, x, attn_mask)
        return x, grid, predictions

    def run_network(self, inputs: Tensor, masked_attn: bool) -> EoMTPredictions:
        """Run the network and return every prediction.

        Args:
            inputs: Normalised images ``[B, C, H, W]`` (sides multiples of the patch size).
            masked_attn: Make the L2 intermediate predictions and use masked attention with the
                keep probabilities ``decoder.attn_mask_probs`` (training); False = one
                prediction with plain attention (inference).

        Returns:
            :class:`EoMTPredictions` (L2 + 1 predictions with masked attention, else 1); it
            unpacks as ``mask_logits_per_layer, class_logits_per_layer``.
        """
        x, grid, predictions = self._run_blocks(inputs, masked_attn)
        mask_logits, class_logits = self._predict(x, grid)
        predictions.mask_logits.append(mask_logits)
        predictions.class_logits.append(class_logits)
        return predictions

    def forward_logits(self, inputs: Tensor) -> Tuple[Tensor, Tensor]:
        """Final ``(mask_logits [B, Q, H/4, W/4], class_logits [B, Q, K + 1])``, no masking."""
        predictions = self.run_network(inputs, masked_attn=False)
        return predictions.mask_logits[-1], predictions.class_logits[-1]

    def _masked_attn(self) -> bool:
        return self.training and self.decoder.masked_attn_enabled

    # ------------------------------------------------------------ mmseg modes
    def extract_feat(self, inputs: Tensor) -> List[Tensor]:
        """Final-normalised token sequence ``[B, Q + P + h*w, D]`` (masked attention off)."""
        x, _, _ = self._run_blocks(inputs, masked_attn=False)
        return [self.backbone.final_norm(x)]

    def _infer(self, inputs: Tensor) -> InferenceOutputs:
        """One pass over ``inputs`` (images or windows): class scores at their resolution."""
        mask_logits, class_logits = self.forward_logits(inputs)
        upsampled = F.interpolate(mask_logits, size=inputs.shape[-2:], mode='bilinear',
                                  align_corners=False)
        return InferenceOutputs(self.decoder.semantic_map(class_logits, upsampled),
                                mask_logits, class_logits)

    def inference(self, inputs: Tensor) -> InferenceOutputs:
        """Inference in the ``test_cfg`` mode with masked attention off.

        Args:
            inputs: Normalised images ``[B, C, H, W]``.

        Returns:
            :class:`InferenceOutputs`: class scores at the input resolution and the raw final
            predictions of every window (slide mode: reference window placement, class scores
            averaged where windows overlap and resized back).
        """
        if self.test_cfg.get('mode', 'whole') != 'slide':
            return self._infer(inputs)
        crop = self.test_cfg['crop_size']
        layout = window_layout(*inputs.shape[-2:], crop if isinstance(crop, int) else crop[0])
        windows = self._infer(crop_windows(inputs, layout))
        seg_logits = stitch_windows(windows.seg_logits, layout, inputs.shape[0])
        return InferenceOutputs(seg_logits, windows.mask_logits, windows.class_logits, layout)

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Per-pixel class scores ``[B, K, H, W]`` at the input resolution (test_cfg mode)."""
        return self.inference(inputs).seg_logits

    def loss(self, inputs: Tensor, data_samples: SampleList) -> dict:
        """Set losses of all predictions (masked attention per ``decoder.masked_attn_enabled``).

        Args:
            inputs: Normalised images ``[B, C, H, W]``.
            data_samples: Samples with ``gt_sem_seg``.

        Returns:
            Loss dict of :meth:`EoMTDecoder.loss`.
        """
        predictions = self.run_network(inputs, masked_attn=self._masked_attn())
        return self.decoder.loss(predictions.mask_logits, predictions.class_logits,
                                 data_samples)

    def predict(self, inputs: Tensor, data_samples: Optional[SampleList] = None) -> SampleList:
        """Semantic prediction with masked attention off.

        Args:
            inputs: Normalised images ``[B, C, H, W]``.
            data_samples: Samples whose metainfo gives ``ori_shape``, padding and flip.

        Returns:
            The samples with ``seg_logits`` (``[K, H, W]`` class scores at ``ori_shape``) and
            ``pred_sem_seg``.
        """
        return self.postprocess_result(self.inference(inputs), data_samples)

    def _forward(self, inputs: Tensor, data_samples: OptConfigType = None) -> EoMTPredictions:
        """Tensor mode: the network's raw predictions (see :meth:`run_network`)."""
        return self.run_network(inputs, masked_attn=self._masked_attn())

    # mmseg's BaseSegmentor.postprocess_result treats a single channel as a sigmoid logit and
    # only knows a class-score tensor; EoMT's scores are already probabilities, and subclasses
    # restore more maps from InferenceOutputs, so it is redone here on the geometry functions.
    def postprocess_result(self, outputs: Union[InferenceOutputs, Tensor],
                           data_samples: Optional[SampleList] = None) -> SampleList:
        """Restore the class scores to each image's original geometry and fill the samples.

        Args:
            outputs: From :meth:`inference`, or a ``[B, K, H, W]`` class-score tensor.
            data_samples: Samples with metainfo (``ori_shape``, ``padding_size`` or
                ``img_padding_size``, ``flip``, ``flip_direction``); None returns new samples
                without geometry changes.

        Returns:
            The filled samples.
        """
        seg_all = outputs.seg_logits if isinstance(outputs, InferenceOutputs) else outputs
        if data_samples is None:
            data_samples = [SegDataSample() for _ in range(seg_all.shape[0])]
        for i, sample in enumerate(data_samples):
            geometry = image_geometry(sample.metainfo or None, seg_all.shape[-2:])
            seg_logits = restore_geometry(seg_all[i:i + 1], geometry, self.align_corners)[0]
            sample.set_data({
                'seg_logits': PixelData(data=seg_logits),
                'pred_sem_seg': PixelData(data=seg_logits.argmax(dim=0, keepdim=True)),
            })
        return data_samples
