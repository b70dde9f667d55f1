"""Loading a state dict into :class:`~eomt_mm.models.backbones.DINOv2`: adapt what can be
adapted (position-embedding grid, patch-kernel size), refuse everything else with the reason.

mmengine's ``load_state_dict`` only warns about shape mismatches and keeps the random weights;
for a backbone that is the silent failure this module exists to prevent.
"""
import math
import re
from typing import Dict, List, Optional

from mmengine.logging import MMLogger
from torch import nn

from eomt_mm.utils.resample import resample_patch_kernel, resize_pos_embed_grid

__all__ = ['fit_dinov2_state_dict', 'raise_misfit', 'structural_problems']


def fit_dinov2_state_dict(backbone: nn.Module, state_dict: dict, prefix: str) -> None:
    """Adapt a state dict in the backbone's own format before loading; refuse misfits.

    Resizes a square patch-only ``pos_embed`` to this module's grid and resamples a patch
    kernel of another size; raises ``ValueError`` for a CLS-inclusive table, another layer
    count, missing/unexpected register tokens or any other shape mismatch (mmengine would
    otherwise only warn and keep the random weights).

    Args:
        backbone: The DINOv2 module being loaded.
        state_dict: The state dict (modified in place).
        prefix: The backbone's key prefix in ``state_dict``.

    Raises:
        ValueError: Listing every problem found (at most 10).
    """
    if not any(k.startswith(prefix) for k in state_dict):
        return
    logger = MMLogger.get_current_instance()
    problems = []
    name = prefix + 'pos_embed'
    src = state_dict.get(name)
    if (src is not None and src.shape != backbone.pos_embed.shape and src.ndim == 3
            and src.shape[-1] == backbone.embed_dims):
        side = math.isqrt(src.shape[1])
        if side * side == src.shape[1]:
            logger.info(f'Resize {name} from {side}x{side} to {backbone.patch_resolution}')
            state_dict[name] = resize_pos_embed_grid(
                src, (side, side), backbone.patch_resolution, backbone.interpolate_mode,
                backbone.pos_embed_antialias)
        elif math.isqrt(src.shape[1] - 1) ** 2 == src.shape[1] - 1:
            problems.append(f'{name} {tuple(src.shape)} includes a CLS position (Meta '
                            f'layout): convert it with tools/convert_weights.py first')
    name = prefix + 'patch_embed.projection.weight'
    own_kernel = backbone.patch_embed.projection.weight
    if (name in state_dict and state_dict[name].ndim == 4
            and state_dict[name].shape[:2] == own_kernel.shape[:2]
            and state_dict[name].shape[2:] != own_kernel.shape[2:]):
        logger.info(f'Resample {name} from {tuple(state_dict[name].shape[2:])} to '
                    f'{tuple(own_kernel.shape[2:])}')
        state_dict[name] = resample_patch_kernel(state_dict[name], own_kernel.shape[2:])

    own = dict(backbone.named_parameters())
    own.update(backbone.named_buffers())
    problems += structural_problems(backbone, state_dict, prefix, own)
    raise_misfit(backbone, problems)


def structural_problems(backbone: nn.Module, state_dict: dict, prefix: str, own: dict,
                        shape_hints: Optional[Dict[str, str]] = None) -> List[str]:
    """What keeps a state dict from fitting a DINOv2-family backbone's structure.

    Shared by DINOv2 and DINOv3 (whose other checks differ): another layer count, register
    tokens present in one and not the other, and tensors of another shape.

    Args:
        backbone: The module (``num_layers``, ``register_tokens``, ``num_register_tokens``).
        state_dict: The state dict being loaded.
        prefix: The backbone's key prefix in ``state_dict``.
        own: The module's tensors to compare shapes with, by key without ``prefix``.
        shape_hints: Key without prefix -> text appended to that key's shape mismatch.

    Returns:
        One sentence per problem (empty when the structure fits).
    """
    problems = []
    layer_re = re.compile(re.escape(prefix) + r'layers\.(\d+)\.')
    ckpt_layers = {int(m.group(1)) for k in state_dict if (m := layer_re.match(k))}
    if ckpt_layers and ckpt_layers != set(range(backbone.num_layers)):
        problems.append(f'checkpoint has layers {min(ckpt_layers)}..{max(ckpt_layers)} '
                        f'({len(ckpt_layers)}), this model has {backbone.num_layers}')
    reg = prefix + 'register_tokens'
    if (reg in state_dict) != (backbone.register_tokens is not None):
        problems.append(f'checkpoint {"has" if reg in state_dict else "lacks"} register_tokens '
                        f'but the model has num_register_tokens={backbone.num_register_tokens}')
    for key, value in own.items():
        full = prefix + key
        if full in state_dict and tuple(state_dict[full].shape) != tuple(value.shape):
            problems.append(f'{full}: checkpoint {tuple(state_dict[full].shape)} vs model '
                            f'{tuple(value.shape)}{(shape_hints or {}).get(key, "")}')
    return problems


def raise_misfit(backbone: nn.Module, problems: List[str]) -> None:
    """Raise ``ValueError`` naming the backbone and its first 10 problems, if there are any.

    Args:
        backbone: The module being loaded (its class name and architecture are quoted).
        problems: Sentences describing what does not fit.
    """
    if problems:
        raise ValueError(f'checkpoint does not fit {type(backbone).__name__}(arch='
                         f'{backbone.arch_name!r}, embed_dims={backbone.embed_dims}, '
                         f'num_layers={backbone.num_layers}, ffn_type={backbone.ffn_type!r}): '
                         + '; '.join(problems[:10])
                         + (f'; ... ({len(problems)} problems)' if len(problems) > 10 else ''))
