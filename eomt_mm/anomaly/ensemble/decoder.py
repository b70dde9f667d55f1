"""``EnsembleEoMTDecoder``: the EoMT decoder whose queries fan one batch out to K members.

EoMT's block loop (:meth:`eomt_mm.models.segmentors.EoMT._run_blocks`) calls
``decoder.prepend_queries`` exactly once, before the first query block. Here that call also turns
the ``B`` shared prefix outputs into ``K * B`` member-stacked rows (member-major), each member
with its own queries, so the prefix blocks have run once and every later block, the final norm
and the heads run on all members in one batched pass. Same parameters and state-dict keys as
:class:`EoMTDecoder` (member-specific tensors are stacked by the ensemble segmentor).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from mmseg.registry import MODELS
from torch import Tensor

from eomt_mm.models.decode_heads.eomt_decoder import EoMTDecoder
from .rng import MemberStreams
from .stacked import check_member_batch

__all__ = ['EnsembleEoMTDecoder']


@MODELS.register_module()
class EnsembleEoMTDecoder(EoMTDecoder):
    """:class:`EoMTDecoder` for K members stacked along the batch axis.

    Args:
        *args: :class:`EoMTDecoder` arguments.
        **kwargs: :class:`EoMTDecoder` keyword arguments.

    Attributes:
        num_members: K (set by the ensemble segmentor; 1 = a plain decoder).
        member_streams: Per-member random streams for the masked-attention draws, or None.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_members = 1
        self.member_streams: Optional[MemberStreams] = None

    def prepend_queries(self, tokens: Tensor) -> Tensor:
        """``[B, N, D]`` shared tokens -> ``[K * B, Q + N, D]``, member ``k``'s queries first.

        Args:
            tokens: Output of the shared prefix (CLS, registers, patches).

        Returns:
            Member-stacked token sequences (rows ``k * B + i`` = member ``k``, image ``i``).
        """
        queries = self.q.weight  # [K, Q, D] when stacked, [Q, D] when shared by all members
        if queries.dim() == 2:
            queries = queries[None].expand(self.num_members, -1, -1)
        batch = tokens.shape[0]
        queries = queries[:, None].expand(-1, batch, -1, -1).reshape(
            self.num_members * batch, *queries.shape[1:])
        return torch.cat([queries, tokens.repeat(self.num_members, 1, 1)], dim=1)

    def build_attn_mask(self, mask_logits: Tensor, grid_size: Tuple[int, int],
                        num_prefix_tokens: int, block_index: int) -> Optional[Tensor]:
        """:meth:`EoMTDecoder.build_attn_mask`, each member's random draws from its own stream."""
        check_member_batch(mask_logits, self.num_members, 'EnsembleEoMTDecoder')
        prob = float(self.attn_mask_probs[block_index])
        if self.member_streams is None or self.num_members == 1 or not 0 < prob < 1:
            # No random draw happens (p = 0 or 1), or there is one stream only.
            return super().build_attn_mask(mask_logits, grid_size, num_prefix_tokens,
                                           block_index)
        masks = []
        for k, rows in enumerate(mask_logits.chunk(self.num_members, dim=0)):
            with self.member_streams.member(k, mask_logits.device):
                masks.append(super().build_attn_mask(rows, grid_size, num_prefix_tokens,
                                                     block_index))
        return torch.cat(masks)
