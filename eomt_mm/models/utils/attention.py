"""Multi-head self-attention pieces shared by the DINOv2 and DINOv3 backbones' blocks.

Both backbones project tokens with one fused ``qkv`` linear (a module, so LoRA wrappers apply)
and attend with ``F.scaled_dot_product_attention``; what lies between is the same: check the
caller's boolean mask, split the fused projection into per-head queries, keys and values.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def check_attn_mask(attn_mask: Optional[Tensor], batch: int, num_heads: int,
                    num_tokens: int) -> None:
    """Refuse an attention mask that SDPA would misread or broadcast wrongly.

    Args:
        attn_mask: ``None`` (no mask) or a bool tensor ``[B | 1, heads | 1, N, N]``, True = may
            attend. A float mask would be added to the logits instead, a silent change of meaning.
        batch: B, the batch size of the tokens.
        num_heads: The number of attention heads.
        num_tokens: N, the number of tokens.

    Raises:
        TypeError: For a mask that is not boolean.
        ValueError: For a mask of another shape.
    """
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool:
        raise TypeError(f'attn_mask must be a bool tensor (True = attend), got {attn_mask.dtype}')
    if (attn_mask.ndim != 4 or attn_mask.shape[-2:] != (num_tokens, num_tokens)
            or attn_mask.shape[0] not in (1, batch) or attn_mask.shape[1] not in (1, num_heads)):
        raise ValueError(f'attn_mask must have shape [{batch} or 1, {num_heads} or 1, '
                         f'{num_tokens}, {num_tokens}], got {tuple(attn_mask.shape)}')


Heads = Tuple[Tensor, Tensor, Tensor]


def split_heads(qkv: Tensor, num_heads: int,
                pack: Tuple[bool, bool, bool] = (True, True, True)) -> Heads:
    """Split a fused projection ``[B, N, 3 * C]`` into queries, keys and values per head.

    Each result is made contiguous: as views of the fused projection, consecutive tokens of one
    head lie ``3 * C`` floats apart, and PyTorch's CPU flash-attention kernel runs measurably
    slower on such rows than on packed ones (``tools/benchmark/inference.py --profile``); the
    copies cost a small fraction of the attention they speed up. The values are unchanged.

    Args:
        qkv: Output of the ``qkv`` linear, ``[B, N, 3 * C]`` ordered (q | k | v), heads inside.
        num_heads: The number of heads H (``C % H == 0``).
        pack: Which of q, k, v to make contiguous; a caller that transforms one into a new
            tensor anyway (DINOv3's RoPE on q and k) leaves it a view.

    Returns:
        ``(q, k, v)``, each ``[B, H, N, C / H]``, contiguous where ``pack`` says.
    """
    batch, num_tokens, width = qkv.shape
    head_dims = width // (3 * num_heads)
    if head_dims * 3 * num_heads != width:
        raise ValueError(f'split_heads: a fused projection of width {width} does not split into '
                         f'3 x {num_heads} heads')
    heads = qkv.reshape(batch, num_tokens, 3, num_heads, head_dims).permute(2, 0, 3, 1, 4)
    return tuple(t.contiguous() if p else t for t, p in zip(heads.unbind(0), pack))
