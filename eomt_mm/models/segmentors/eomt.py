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
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS
from mmseg.utils import OptConfigType, OptMultiConfig, SampleList
from torch import Tensor

PredList = Tuple[List[Tensor], List[Tensor]]


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
            ``data_sample.anomaly_scores``.
        lora_config: LoRA config block (see :func:`eomt_mm.lora.apply_lora`); applied at the end
            of the constructor so trainability is settled before DDP wraps the model.
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 backbone: dict,
                 decoder: dict,
                 data_preprocessor: OptConfigType = None,
                 train_cfg: OptConfigType = None,
                 test_cfg: OptConfigType = None,
                 lora_config: Optional[dict] = None,
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
        if lora_config is not None:
            # Imported here: the LoRA package imports model code, not the other way round.
            from eomt_mm.lora import apply_lora
            apply_lora(self, lora_config)

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
            x = backbone.forward_block(i, x)
        x = torch.cat([decoder.q.weight[None].expand(x.shape[0], -1, -1), x], dim=1)
        mask_logits_per_layer, class_logits_per_layer = [], []
        for j in range(num_blocks):
            attn_mask = None
            if masked_attn:
                mask_logits, class_logits = decoder.predict(backbone.final_norm(x), grid,
                                                            num_prefix)
                mask_logits_per_layer.append(mask_logits)
                class_logits_per_layer.append(class_logits)
                attn_mask = decoder.build_attn_mask(mask_logits, grid, num_prefix, j)
            x = backbone.forward_block(first_query_block + j, x, attn_mask)
        mask_logits, class_logits = decoder.predict(backbone.final_norm(x), grid, num_prefix)
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
            x = backbone.forward_block(i, x)
        return [backbone.final_norm(x)]

    def _dense_outputs(self, inputs: Tensor, anomaly_maps: bool) -> Dict[str, Tensor]:
        """Outputs of one pass at the resolution of ``inputs``.

        Args:
            inputs: Normalised images.
            anomaly_maps: With ``test_cfg.anomaly_scores``: True = return the score maps
                (``'anomaly.<name>'``, [B, 1, H, W], for windows that are stitched afterwards);
                False = return the upsampled mask logits and the class logits
                (``'mask_logits'``, ``'class_logits'``) so the scores are computed after the
                mask logits are brought to the label resolution.

        Returns:
            ``'seg_logits'`` [B, K, H, W] plus the anomaly entries described above.
        """
        mask_logits, class_logits = self.forward_logits(inputs)
        mask_logits = F.interpolate(mask_logits, size=inputs.shape[-2:], mode='bilinear',
                                    align_corners=False)
        outputs = {'seg_logits': self.class_scores(mask_logits, class_logits)}
        names = self.test_cfg.get('anomaly_scores')
        if not names:
            return outputs
        if not anomaly_maps:
            outputs.update(mask_logits=mask_logits, class_logits=class_logits)
            return outputs
        for name, value in self._anomaly_scores(class_logits, mask_logits).items():
            outputs['anomaly.' + name] = value[:, None]
        return outputs

    def _anomaly_scores(self, class_logits: Tensor, mask_logits: Tensor) -> Dict[str, Tensor]:
        """``test_cfg.anomaly_scores`` via :func:`eomt_mm.anomaly.scores.compute_anomaly_scores`."""
        # Imported here: the anomaly package is optional for plain segmentation.
        from eomt_mm.anomaly.scores import compute_anomaly_scores
        names = list(self.test_cfg['anomaly_scores'])
        scores = compute_anomaly_scores(class_logits, mask_logits, names)
        missing = [n for n in names if n not in scores]
        if missing:
            raise KeyError(f'compute_anomaly_scores returned no {missing}')
        return {name: scores[name].float() for name in names}

    def _slide_outputs(self, inputs: Tensor) -> Dict[str, Tensor]:
        """Reference sliding-window inference (tue-mps/eomt ``window_imgs_semantic``).

        Resize so the short side equals the crop, cover the long side with
        ``ceil(long / crop)`` square windows spread evenly, average the overlaps of the per-pixel
        outputs, resize back to the input size.
        """
        crop = self.test_cfg['crop_size']
        crop = crop if isinstance(crop, int) else int(crop[0])
        height, width = inputs.shape[-2:]
        factor = max(crop / height, crop / width)
        new_h, new_w = round(height * factor), round(width * factor)
        resized = inputs
        if (new_h, new_w) != (height, width):
            # antialias matches the reference's PIL bilinear resize when shrinking.
            resized = F.interpolate(inputs, size=(new_h, new_w), mode='bilinear',
                                    align_corners=False, antialias=True)
        along_h = new_h > new_w
        long_side = new_h if along_h else new_w
        num_crops = math.ceil(long_side / crop)
        overlap = num_crops * crop - long_side
        step = crop - (overlap / (num_crops - 1) if overlap > 0 else 0)
        starts = [int(j * step) for j in range(num_crops)]
        windows = [resized[:, :, s:s + crop] if along_h else resized[..., s:s + crop]
                   for s in starts]
        batch = inputs.shape[0]
        # Anomaly scores are stitched like the class scores: mask logits of different windows
        # belong to different query sets and cannot be averaged.
        outputs = self._dense_outputs(torch.cat(windows, dim=0), anomaly_maps=True)
        merged = {}
        for key, value in outputs.items():
            total = value.new_zeros(batch, value.shape[1], new_h, new_w)
            count = value.new_zeros(1, 1, new_h, new_w)
            for j, s in enumerate(starts):
                part = value[j * batch:(j + 1) * batch]
                if along_h:
                    total[:, :, s:s + crop] += part
                    count[:, :, s:s + crop] += 1
                else:
                    total[..., s:s + crop] += part
                    count[..., s:s + crop] += 1
            merged[key] = total / count
            if (new_h, new_w) != (height, width):
                merged[key] = F.interpolate(merged[key], size=(height, width), mode='bilinear',
                                            align_corners=False)
        return merged

    def _inference_outputs(self, inputs: Tensor) -> Dict[str, Tensor]:
        if self.test_cfg.get('mode', 'whole') == 'slide':
            return self._slide_outputs(inputs)
        return self._dense_outputs(inputs, anomaly_maps=False)

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Per-pixel class scores ``[B, K, H, W]`` at the input resolution (test_cfg mode)."""
        return self._inference_outputs(inputs)['seg_logits']

    def loss(self, inputs: Tensor, data_samples: SampleList) -> dict:
        """Set losses of all predictions (masked attention per ``decoder.masked_attn_enabled``).

        Args:
            inputs: Normalised images ``[B, C, H, W]``.
            data_samples: Samples with ``gt_sem_seg``.

        Returns:
            Loss dict (see :meth:`EoMTDecoder.loss`).
        """
        masked = self.training and self.decoder.masked_attn_enabled
        mask_logits, class_logits = self.run_network(inputs, masked_attn=masked)
        return self.decoder.loss(mask_logits, class_logits, data_samples)

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
        outputs = self._inference_outputs(inputs)
        return self.postprocess_result(outputs, data_samples)

    def _forward(self, inputs: Tensor, data_samples: OptConfigType = None) -> PredList:
        """Tensor mode: the network's raw ``(mask_logits_per_layer, class_logits_per_layer)``."""
        masked = self.training and self.decoder.masked_attn_enabled
        return self.run_network(inputs, masked_attn=masked)

    # mmseg's BaseSegmentor.postprocess_result undoes padding / flip / resize for the class
    # scores only and treats a single channel as a sigmoid logit; EoMT scores are already
    # probabilities and the anomaly maps need the same geometry, so it is redone here.
    def postprocess_result(self, outputs: Dict[str, Tensor] | Tensor,
                           data_samples: Optional[SampleList] = None) -> SampleList:
        """Restore outputs to each image's original geometry and fill the data samples.

        Args:
            outputs: At the (padded) input resolution: ``'seg_logits'`` [B, K, H, W] and
                optionally either ``'anomaly.<name>'`` [B, 1, H, W] maps (slide mode) or
                ``'mask_logits'`` [B, Q, H, W] + ``'class_logits'`` [B, Q, K + 1] (whole mode:
                the mask logits are restored to the original resolution, then scored); or the
                class-score tensor alone.
            data_samples: Samples with metainfo (``ori_shape``, ``padding_size`` or
                ``img_padding_size``, ``flip``, ``flip_direction``); None returns new samples
                without geometry changes.

        Returns:
            The filled samples.
        """
        from mmseg.structures import SegDataSample
        if isinstance(outputs, Tensor):
            outputs = {'seg_logits': outputs}
        outputs = dict(outputs)
        mask_logits = outputs.pop('mask_logits', None)
        class_logits = outputs.pop('class_logits', None)
        batch = outputs['seg_logits'].shape[0]
        if data_samples is None:
            data_samples = [SegDataSample() for _ in range(batch)]
            metas = [None] * batch
        else:
            metas = [sample.metainfo for sample in data_samples]
        for i, (sample, meta) in enumerate(zip(data_samples, metas)):
            restored = {k: self._restore_geometry(v[i:i + 1], meta) for k, v in outputs.items()}
            seg_logits = restored.pop('seg_logits')
            sample.set_data({
                'seg_logits': PixelData(data=seg_logits),
                'pred_sem_seg': PixelData(data=seg_logits.argmax(dim=0, keepdim=True)),
            })
            scores = {k[len('anomaly.'):]: v.float() for k, v in restored.items()}
            if mask_logits is not None:
                masks = self._restore_geometry(mask_logits[i:i + 1], meta)[None]
                scores = {k: v[0][None] for k, v in
                          self._anomaly_scores(class_logits[i:i + 1], masks).items()}
            if scores:
                sample.anomaly_scores = PixelData(**scores)
        return data_samples

    def _restore_geometry(self, value: Tensor, meta: Optional[dict]) -> Tensor:
        """``[1, C, H, W]`` -> ``[C, h, w]``: remove padding, undo flip, resize to ori_shape."""
        if meta is None:
            return value[0]
        height, width = value.shape[-2:]
        left, right, top, bottom = meta.get('img_padding_size',
                                            meta.get('padding_size', [0, 0, 0, 0]))
        value = value[..., top:height - bottom, left:width - right]
        if meta.get('flip', False):
            direction = meta.get('flip_direction')
            if direction == 'horizontal':
                value = value.flip(dims=(3, ))
            elif direction == 'vertical':
                value = value.flip(dims=(2, ))
            else:
                raise ValueError(f'unknown flip_direction {direction!r} in img_meta')
        if 'ori_shape' in meta and tuple(value.shape[-2:]) != tuple(meta['ori_shape'][:2]):
            value = F.interpolate(value, size=tuple(meta['ori_shape'][:2]), mode='bilinear',
                                  align_corners=self.align_corners)
        return value[0]
