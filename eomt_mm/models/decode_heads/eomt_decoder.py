"""The EoMT decoder: learnable queries, class / mask heads, upscaler, masked attention and loss.

EoMT has no separate decoder network: its queries join the ViT's own token sequence before the
last ``num_blocks`` blocks (the segmentor, :class:`eomt_mm.models.segmentors.EoMT`, runs those
blocks). What is left for this module is everything the backbone does not own:

* the query embedding ``q`` (``num_queries x embed_dims``) and :meth:`prepend_queries`, which
  puts the queries in front of the token sequence;
* :meth:`predict`: class logits ``Linear(D, K + 1)`` and mask logits
  ``einsum(mask_head(q), upscale(patch grid))`` at 1/4 of the input resolution;
* :meth:`build_attn_mask`: the masked-attention mask derived from an intermediate prediction,
  with the per-block keep probabilities ``attn_mask_probs`` (annealed by ``MaskAnnealingHook``);
* :meth:`loss`: the Mask2Former set loss with deep supervision over all predictions, and its
  :attr:`ignore_index`;
* :func:`semantic_map` (also :meth:`EoMTDecoder.semantic_map`): the per-pixel class scores
  ``S_k = sum_q softmax(c_q)[k] * sigmoid(m_q)``, the one place this map is defined (the anomaly
  scores build on it).

It is not an mmseg ``BaseDecodeHead``: that class builds a ``conv_seg`` classifier over feature
maps and expects ``in_channels``/``channels`` inputs, none of which EoMT has.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmpretrain.models.utils import LayerNorm2d
from mmseg.registry import MODELS
from mmseg.utils import SampleList
from torch import Tensor

from eomt_mm.models.losses.mask_classification_loss import MaskClassificationLoss


def semantic_map(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-pixel class scores ``S_k = sum_q softmax(c_q)[k] * sigmoid(m_q)`` over K real classes.

    Computed in the inputs' dtype (callers that need float32 pass float32 tensors).

    Args:
        class_logits: ``[B, Q, K + 1]`` per-query class logits (last entry = no object).
        mask_logits: ``[B, Q, H, W]`` per-query mask logits, already at the wanted resolution.

    Returns:
        ``[B, K, H, W]``.
    """
    return torch.einsum('bqk,bqhw->bkhw', class_logits.softmax(-1)[..., :-1],
                        mask_logits.sigmoid())


class StridedLayerNorm2d(LayerNorm2d):
    """mmpretrain's ``LayerNorm2d`` without the final ``.contiguous()``.

    The channel-first output is returned as a permuted view of the channel-last result, as timm
    and transformers do. mmpretrain copies it back to NCHW, which in the upscaler means one more
    full-width map at 1/4 resolution per pass; the convolution and the mask einsum that follow
    read the strided view directly (the README's Performance section has the measured effect).
    Parameters and state-dict keys are those of the parent, so checkpoints are unchanged.

    Args:
        num_channels: Channels normalised.
        **kwargs: ``nn.LayerNorm`` arguments (``eps``, ``elementwise_affine``).
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``[B, C, H, W]`` over C."""
        if x.dim() != 4:
            raise ValueError(f'StridedLayerNorm2d expects [B, C, H, W], got {tuple(x.shape)}')
        out = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                           self.eps)
        return out.permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """One 2x upscaling step of the EoMT upscaler.

    ``ConvTranspose2d(k=2, s=2) -> GELU -> depthwise Conv2d(k=3, no bias) -> LayerNorm2d``.
    Attribute names (``conv1``, ``conv2``, ``norm``) follow the official EoMT checkpoints.

    Args:
        embed_dims: Channels in and out.
    """

    def __init__(self, embed_dims: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(embed_dims, embed_dims, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(embed_dims, embed_dims, kernel_size=3, padding=1,
                               groups=embed_dims, bias=False)
        # The reference uses timm's LayerNorm2d, whose eps is 1e-6.
        self.norm = StridedLayerNorm2d(embed_dims, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        """Upscale ``[B, D, h, w]`` to ``[B, D, 2h, 2w]`` (a channel-last tensor in NCHW view)."""
        return self.norm(self.conv2(self.transposed_conv(x, activate=True)))

    def transposed_conv(self, x: Tensor, activate: bool = False) -> Tensor:
        """``self.conv1(x)`` (``self.act(self.conv1(x))`` with ``activate``) as one GEMM.

        A 2x2 transposed convolution with stride 2 has no overlapping outputs: each input pixel
        maps to its own 2x2 output pixels through one ``[D_in] -> [2, 2, D_out]`` linear map.
        Written that way it is a single GEMM over all pixels in channel-last layout, which the
        tokens already have; PyTorch's CPU transposed convolution ran the same product at a
        fraction of GEMM speed and converted layouts around it (``tools/benchmark/inference.py
        --profile``). The result equals ``conv1(x)`` up to float summation order, and stays
        channel-last for the depthwise convolution, the norm and the mask product after it.
        ``conv1`` stays an ``nn.ConvTranspose2d`` so that parameters and checkpoints are
        unchanged.

        The activation is elementwise, so it commutes with the pixel shuffle: applied before it,
        and in place when no gradient is recorded, it spares one full-resolution map.

        Args:
            x: ``[B, D_in, h, w]`` of any memory layout.
            activate: Apply ``self.act`` (GELU) too.

        Returns:
            ``[B, D_out, 2h, 2w]`` whose memory is channel-last (``torch.channels_last``).
        """
        conv = self.conv1
        batch, channels, height, width = x.shape
        out_channels = conv.out_channels
        pixels = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        # weight [D_in, D_out, 2, 2] -> [D_in, (row offset, column offset, D_out)].
        weight = conv.weight.permute(0, 2, 3, 1).reshape(channels, 4 * out_channels)
        out = torch.addmm(conv.bias.repeat(4), pixels, weight)
        if activate:
            if torch.is_grad_enabled() or not isinstance(self.act, nn.GELU):
                out = self.act(out)
            else:
                out = torch.ops.aten.gelu_(out, approximate=self.act.approximate)
        out = out.view(batch, height, width, 2, 2, out_channels).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, 2 * height, 2 * width, out_channels)
        return out.permute(0, 3, 1, 2)


@MODELS.register_module()
class EoMTDecoder(BaseModule):
    """Queries, prediction heads, masked attention and set loss of EoMT.

    Args:
        num_classes: Number of real classes K (the class head has K + 1 outputs; the last is
            "no object").
        embed_dims: Token width D of the backbone.
        patch_size: Backbone patch size; the upscaler has ``max(1, log2(patch_size) - 2)``
            2x blocks (2 for patch 16, so masks come out at 1/4 of the input).
        num_queries: Number of learnable queries.
        num_blocks: Number L2 of final backbone blocks the queries go through.
        masked_attn_enabled: Whether training uses masked attention (and therefore makes the
            L2 intermediate predictions used for deep supervision).
        num_points: Points per mask for matching and for the mask losses (reference: 12544).
        oversample_ratio: Oversampling of candidate points for importance sampling.
        importance_sample_ratio: Share of the points chosen by uncertainty.
        class_weight: Weight of the class cost and of the class loss.
        mask_weight: Weight of the sigmoid-BCE mask cost and loss.
        dice_weight: Weight of the dice cost and loss.
        no_object_weight: Cross-entropy weight of the "no object" class.
        ignore_index: Label value ignored when building target masks.
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 num_classes: int,
                 embed_dims: int,
                 patch_size: int,
                 num_queries: int = 100,
                 num_blocks: int = 4,
                 masked_attn_enabled: bool = True,
                 num_points: int = 12544,
                 oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75,
                 class_weight: float = 2.0,
                 mask_weight: float = 5.0,
                 dice_weight: float = 5.0,
                 no_object_weight: float = 0.1,
                 ignore_index: int = 255,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        for name, value in (('num_classes', num_classes), ('embed_dims', embed_dims),
                            ('patch_size', patch_size), ('num_queries', num_queries),
                            ('num_blocks', num_blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'EoMTDecoder: {name} must be a positive int, got {value!r}')
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.patch_size = patch_size
        self.num_queries = num_queries
        self.num_blocks = num_blocks
        self.masked_attn_enabled = masked_attn_enabled

        # Probability of *keeping* the mask in each of the L2 blocks; saved in checkpoints so a
        # resumed or evaluated model sees the same value the hook last set.
        self.register_buffer('attn_mask_probs', torch.ones(num_blocks), persistent=True)

        self.q = nn.Embedding(num_queries, embed_dims)
        self.class_head = nn.Linear(embed_dims, num_classes + 1)
        self.mask_head = nn.Sequential(
            nn.Linear(embed_dims, embed_dims), nn.GELU(),
            nn.Linear(embed_dims, embed_dims), nn.GELU(),
            nn.Linear(embed_dims, embed_dims))
        num_upscale = max(1, int(math.log2(patch_size)) - 2)
        self.upscale = nn.Sequential(*[ScaleBlock(embed_dims) for _ in range(num_upscale)])

        self.loss_module = MaskClassificationLoss(
            num_classes=num_classes,
            num_queries=num_queries,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            no_object_weight=no_object_weight,
            ignore_index=ignore_index)

    #: See :func:`semantic_map`.
    semantic_map = staticmethod(semantic_map)

    @property
    def ignore_index(self) -> int:
        """Label value the set loss ignores (void pixels)."""
        return self.loss_module.ignore_index

    def prepend_queries(self, tokens: Tensor) -> Tensor:
        """``[B, N, D]`` -> ``[B, Q + N, D]``: the learnable queries in front of the tokens.

        Args:
            tokens: Backbone tokens (CLS, registers, patches).

        Returns:
            The token sequence the last ``num_blocks`` backbone blocks run on.
        """
        queries = self.q.weight[None].expand(tokens.shape[0], -1, -1)
        return torch.cat([queries, tokens], dim=1)

    def predict(self, tokens: Tensor, grid_size: Tuple[int, int],
                num_prefix_tokens: int) -> Tuple[Tensor, Tensor]:
        """Predict masks and classes from the (final-normalised) token sequence.

        Args:
            tokens: ``[B, Q + P + h*w, D]`` ordered queries, CLS + registers (P =
                ``num_prefix_tokens``), patches; already passed through the backbone's final norm.
            grid_size: Patch grid ``(h, w)``.
            num_prefix_tokens: P, the number of CLS + register tokens.

        Returns:
            ``(mask_logits [B, Q, h * s, w * s], class_logits [B, Q, K + 1])`` with ``s = 2 **
            len(upscale)`` (4 for patch 16).
        """
        h, w = grid_size
        expected = self.num_queries + num_prefix_tokens + h * w
        if tokens.ndim != 3 or tokens.shape[1] != expected or tokens.shape[2] != self.embed_dims:
            raise ValueError(
                f'EoMTDecoder.predict: expected tokens [B, {expected}, {self.embed_dims}] '
                f'({self.num_queries} queries + {num_prefix_tokens} prefix + {h}x{w} patches), '
                f'got {tuple(tokens.shape)}')
        queries = tokens[:, :self.num_queries]
        class_logits = self.class_head(queries)
        patches = tokens[:, self.num_queries + num_prefix_tokens:]
        grid = patches.transpose(1, 2).reshape(tokens.shape[0], self.embed_dims, h, w)
        mask_logits = torch.einsum('bqc,bchw->bqhw', self.mask_head(queries), self.upscale(grid))
        return mask_logits, class_logits

    def forward(self, tokens: Tensor, grid_size: Tuple[int, int],
                num_prefix_tokens: int) -> Tuple[Tensor, Tensor]:
        """Same as :meth:`predict`."""
        return self.predict(tokens, grid_size, num_prefix_tokens)

    def build_attn_mask(self, mask_logits: Tensor, grid_size: Tuple[int, int],
                        num_prefix_tokens: int, block_index: int) -> Optional[Tensor]:
        """Attention mask for one of the L2 blocks from an intermediate prediction.

        Query -> patch attention is allowed where the mask logit, bilinearly resized to the patch
        grid, is > 0. Queries always see queries, CLS and registers; patch and prefix tokens are
        never masked. Each query independently gets full attention when ``rand > p`` with
        ``p = attn_mask_probs[block_index]`` (``torch.rand`` is drawn only when ``p < 1``).

        Args:
            mask_logits: ``[B, Q, H', W']`` intermediate mask logits.
            grid_size: Patch grid ``(h, w)``.
            num_prefix_tokens: Number of CLS + register tokens.
            block_index: Index ``j`` in ``[0, num_blocks)`` of the block (0 = first query block).

        Returns:
            Bool mask ``[B, 1, N, N]`` (True = may attend), ``N = Q + P + h*w``; ``None`` when
            ``p == 0`` (every query attends everywhere, which is what no mask means).
        """
        if not 0 <= block_index < self.num_blocks:
            raise IndexError(f'block_index {block_index} out of range [0, {self.num_blocks})')
        prob = float(self.attn_mask_probs[block_index])
        if prob <= 0:
            return None
        batch, num_queries = mask_logits.shape[:2]
        h, w = grid_size
        num_tokens = num_queries + num_prefix_tokens + h * w
        query_to_patch = F.interpolate(mask_logits, size=(h, w), mode='bilinear',
                                       align_corners=False).flatten(2) > 0
        if prob < 1:
            full = torch.rand(batch, num_queries, device=mask_logits.device) > prob
            query_to_patch = query_to_patch | full[..., None]
        attn_mask = torch.ones(batch, num_tokens, num_tokens, dtype=torch.bool,
                               device=mask_logits.device)
        attn_mask[:, :num_queries, num_queries + num_prefix_tokens:] = query_to_patch
        return attn_mask[:, None]

    def loss(self, mask_logits_per_layer: Sequence[Tensor],
             class_logits_per_layer: Sequence[Tensor],
             batch_data_samples: SampleList) -> dict:
        """Set loss summed with equal weights over all predictions (deep supervision).

        Args:
            mask_logits_per_layer: One ``[B, Q, H', W']`` tensor per prediction, the final one last.
            class_logits_per_layer: One ``[B, Q, K + 1]`` tensor per prediction.
            batch_data_samples: Samples with ``gt_sem_seg``.

        Returns:
            ``loss_cls``, ``loss_mask``, ``loss_dice`` for the final prediction and
            ``d{i}.loss_*`` for intermediate prediction ``i`` (already weighted).
        """
        if len(mask_logits_per_layer) != len(class_logits_per_layer) or not mask_logits_per_layer:
            raise ValueError('need the same, non-zero number of mask and class predictions, got '
                             f'{len(mask_logits_per_layer)} and {len(class_logits_per_layer)}')
        gt_instances = self.loss_module.targets_from_samples(batch_data_samples)
        losses = {}
        last = len(mask_logits_per_layer) - 1
        for i, (mask_logits, class_logits) in enumerate(
                zip(mask_logits_per_layer, class_logits_per_layer)):
            layer_losses = self.loss_module(mask_logits, class_logits, gt_instances)
            prefix = '' if i == last else f'd{i}.'
            losses.update({prefix + k: v for k, v in layer_losses.items()})
        return losses
