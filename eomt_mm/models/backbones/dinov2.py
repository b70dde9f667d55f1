"""DINOv2 ViT (optionally with register tokens) on top of mmpretrain's VisionTransformer.

mmpretrain's ``VisionTransformer`` already provides the patch embedding, the encoder layers
(``layers.{i}.ln1 / attn.qkv / attn.proj / attn.gamma1 / ln2 / ffn.layers.0.0 / ffn.layers.1 /
ffn.gamma2``; ``ffn.w12 / ffn.w3`` for the SwiGLU giant), layer scale, drop path, the final
LayerNorm ``ln1``, output formatting and ``get_layer_depth`` for layer-wise lr decay. What it lacks
and this class adds:

* register tokens (``register_tokens``, 0 or 4), which get no position embedding;
* the timm / EoMT-reference position-embedding layout: ``pos_embed`` covers the patch grid only
  (``no_embed_class``); a checkpoint's CLS position is folded into ``cls_token`` by the converter;
* position embeddings resized for every input whose sides are multiples of the patch size, with
  bicubic + anti-aliasing like timm (mmpretrain's resize does not anti-alias);
* block-level access for EoMT: :meth:`embed`, :meth:`forward_block` (SDPA with a boolean mask) and
  :meth:`final_norm`;
* DINOv2 arch presets (mmpretrain's ``'s'`` is a different 768-wide model and it has no DINOv2 B/L).

Internal checkpoint format = this module's own ``state_dict`` keys. Loading a state dict whose
patch kernel or position grid differs from the module resamples them (logged); any other shape or
layer-count mismatch raises ``ValueError`` instead of being skipped with a warning.
"""
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.weight_init import trunc_normal_
from mmpretrain.models import VisionTransformer
from mmseg.registry import MODELS

from eomt_mm.utils.resample import resize_pos_embed_grid

from ..utils.attention import check_attn_mask, split_heads

from .dinov2_loading import fit_dinov2_state_dict

_DINOV2_ARCHS = {
    's': dict(embed_dims=384, num_layers=12, num_heads=6, feedforward_channels=1536),
    'b': dict(embed_dims=768, num_layers=12, num_heads=12, feedforward_channels=3072),
    'l': dict(embed_dims=1024, num_layers=24, num_heads=16, feedforward_channels=4096),
    # Meta's SwiGLUFFNFused: hidden = (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096, w12 is 1536 -> 8192.
    'g': dict(embed_dims=1536, num_layers=40, num_heads=24, feedforward_channels=6144,
              ffn_type='swiglu_fused'),
}
_ARCH_ALIASES = {'small': 's', 'base': 'b', 'large': 'l', 'giant': 'g'}


def _build_arch_zoo() -> dict:
    zoo = {}
    for short, settings in _DINOV2_ARCHS.items():
        long = {v: k for k, v in _ARCH_ALIASES.items()}[short]
        for name in (short, long, f'dinov2-{short}', f'dinov2-{long}'):
            zoo[name] = settings
    return zoo


@MODELS.register_module()
class DINOv2(VisionTransformer):
    """DINOv2 Vision Transformer with optional register tokens.

    Args:
        arch: ``'s' | 'b' | 'l' | 'g'`` (also ``'small'``, ``'dinov2-b'``, ``'dinov2-base'``...)
            or a dict with ``embed_dims``, ``num_layers``, ``num_heads``,
            ``feedforward_channels`` and optionally ``ffn_type`` (``'origin'`` = GELU MLP,
            ``'swiglu_fused'`` = SwiGLU, whose linears are ``ffn.w12`` (fc1, fused gate+value)
            and ``ffn.w3`` (fc2)).
        img_size: Image size the position-embedding table is built for; must be a multiple of
            ``patch_size``. 518 with patch 14 is DINOv2's native 37x37 grid; EoMT uses 640 / 16.
        patch_size: 14 (DINOv2) or 16 (EoMT's resampled kernel); any positive int works.
        num_register_tokens: Number of register tokens (0 or 4 for released DINOv2 weights).
        in_channels: Number of input image channels.
        out_indices: Layers whose output :meth:`forward` returns (mmpretrain semantics).
        drop_rate: Dropout after the position embedding and inside the layers.
        drop_path_rate: Stochastic depth rate (linearly increasing over layers).
        qkv_bias: Whether the qkv projection has a bias.
        norm_cfg: Norm layer config (DINOv2: LayerNorm eps 1e-6).
        final_norm: Must be True: DINOv2 always ends with a LayerNorm, exposed as
            :meth:`final_norm`.
        out_type: ``'featmap'`` (B, C, h, w), ``'raw'`` (B, N, C), ``'cls_token'`` or
            ``'avg_featmap'``.
        with_cls_token: Must be True (DINOv2 always has a CLS token).
        frozen_stages: Freeze embeddings and the first ``frozen_stages`` layers (-1: none).
        interpolate_mode: Interpolation mode for position-embedding resizing.
        pos_embed_antialias: Anti-alias when resizing position embeddings (timm's behaviour).
        layer_scale_init_value: Initial layer-scale value (DINOv2: 1e-5; 0 disables layer scale).
        patch_cfg: Extra config for the mmcv ``PatchEmbed``.
        layer_cfgs: Extra config for every (dict) or each (list) encoder layer.
        pre_norm: Whether to apply a LayerNorm before the layers (not used by DINOv2).
        init_cfg: mmengine init config, e.g. ``dict(type='Pretrained', checkpoint=PATH,
            prefix='backbone.')`` for a file written by ``tools/convert_weights.py``.
    """

    arch_zoo = _build_arch_zoo()

    def __init__(self,
                 arch: str | dict = 'b',
                 img_size: int | Sequence[int] = 518,
                 patch_size: int = 14,
                 num_register_tokens: int = 4,
                 in_channels: int = 3,
                 out_indices: int | Sequence[int] = -1,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 qkv_bias: bool = True,
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 final_norm: bool = True,
                 out_type: str = 'featmap',
                 with_cls_token: bool = True,
                 frozen_stages: int = -1,
                 interpolate_mode: str = 'bicubic',
                 pos_embed_antialias: bool = True,
                 layer_scale_init_value: float = 1e-5,
                 patch_cfg: dict = dict(),
                 layer_cfgs: dict | Sequence[dict] = dict(),
                 pre_norm: bool = False,
                 init_cfg: Optional[dict] = None):
        if isinstance(arch, str):
            key = arch.lower()
            if key not in self.arch_zoo:
                raise ValueError(f'Unknown DINOv2 arch {arch!r}; expected one of '
                                 f'{sorted(self.arch_zoo)} or a dict')
            arch_settings = dict(self.arch_zoo[key])
        elif isinstance(arch, dict):
            needed = {'embed_dims', 'num_layers', 'num_heads', 'feedforward_channels'}
            if not needed <= set(arch):
                raise ValueError(f'Custom arch dict needs keys {sorted(needed)}, '
                                 f'got {sorted(arch)}')
            arch_settings = dict(arch)
        else:
            raise TypeError(f'arch must be a str or dict, got {type(arch).__name__}')
        ffn_type = arch_settings.pop('ffn_type', 'origin')
        if ffn_type not in ('origin', 'swiglu_fused'):
            raise ValueError(f"ffn_type must be 'origin' or 'swiglu_fused', got {ffn_type!r}")
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f'patch_size must be a positive int, got {patch_size!r}')
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(img_hw) != 2 or any(s % patch_size for s in img_hw):
            raise ValueError(f'img_size {img_size} must have sides that are multiples of '
                             f'patch_size {patch_size}')
        if not isinstance(num_register_tokens, int) or num_register_tokens < 0:
            raise ValueError(f'num_register_tokens must be an int >= 0, '
                             f'got {num_register_tokens!r}')
        if not final_norm:
            raise ValueError('DINOv2 always has a final LayerNorm: final_norm must be True')
        if not with_cls_token:
            raise ValueError('DINOv2 always has a CLS token: with_cls_token must be True')
        if arch_settings['embed_dims'] % arch_settings['num_heads']:
            raise ValueError(f"embed_dims {arch_settings['embed_dims']} is not divisible by "
                             f"num_heads {arch_settings['num_heads']}")

        if isinstance(layer_cfgs, dict):
            layer_cfgs = [dict(ffn_type=ffn_type, **layer_cfgs)] * arch_settings['num_layers']
        else:
            layer_cfgs = [dict(dict(ffn_type=ffn_type), **cfg) for cfg in layer_cfgs]

        # Freezing is applied at the end, after the register tokens exist.
        super().__init__(
            arch=arch_settings, img_size=img_hw, patch_size=patch_size, in_channels=in_channels,
            out_indices=list(out_indices) if not isinstance(out_indices, int) else out_indices,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, qkv_bias=qkv_bias,
            norm_cfg=norm_cfg, final_norm=True, out_type=out_type, with_cls_token=True,
            frozen_stages=-1, interpolate_mode=interpolate_mode,
            layer_scale_init_value=layer_scale_init_value, patch_cfg=patch_cfg,
            layer_cfgs=layer_cfgs, pre_norm=pre_norm, init_cfg=init_cfg)

        # mmpretrain draws the per-block drop-path rates with np.linspace, so each DropPath holds
        # a numpy float, which torch.compile turns into a tensor whose guard fails under
        # torch.inference_mode; a plain float behaves the same in eager mode and compiles.
        for module in self.modules():
            if hasattr(module, 'drop_prob'):
                module.drop_prob = float(module.drop_prob)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        self.ffn_type = ffn_type
        self.patch_size = patch_size
        self.num_heads = arch_settings['num_heads']
        self.pos_embed_antialias = pos_embed_antialias
        self.num_register_tokens = num_register_tokens
        # Registers sit between CLS and the patches and carry no position embedding.
        if num_register_tokens > 0:
            self.register_tokens = nn.Parameter(
                torch.zeros(1, num_register_tokens, self.embed_dims))
        else:
            self.register_tokens = None
        # mmpretrain's `_format_output` strips `num_extra_tokens` prefix tokens.
        self.num_extra_tokens = 1 + num_register_tokens
        # Patch-only table (timm `no_embed_class`), replacing mmpretrain's CLS-inclusive one.
        h, w = self.patch_resolution
        self.pos_embed = nn.Parameter(torch.zeros(1, h * w, self.embed_dims))

        self.frozen_stages = frozen_stages
        if frozen_stages > 0:
            self._freeze_stages()

    # mmpretrain stores its constructor flag as `self.final_norm = bool`; this project's API needs
    # `final_norm(x)` as a method, so the attribute is a property whose setter keeps the flag.
    @property
    def final_norm(self):
        """Apply the backbone's final LayerNorm (mmpretrain's ``ln1``): ``final_norm(x) -> x``."""
        return self._apply_final_norm

    @final_norm.setter
    def final_norm(self, value: bool) -> None:
        if not value:
            raise ValueError('DINOv2 always has a final LayerNorm: final_norm must be True')

    def _apply_final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln1(x)

    @property
    def num_prefix_tokens(self) -> int:
        """Number of tokens before the patch tokens: CLS + registers."""
        return 1 + self.num_register_tokens

    def init_weights(self) -> None:
        """Random init like DINOv2 unless a pretrained checkpoint is configured.

        Raises:
            FileNotFoundError: If ``init_cfg`` names a local Pretrained file that does not
                exist; the message says how to get and convert DINOv2 weights.
        """
        self._check_pretrained_file()
        super().init_weights()
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'):
            nn.init.normal_(self.cls_token, std=1e-6)
            if self.register_tokens is not None:
                nn.init.normal_(self.register_tokens, std=1e-6)
            trunc_normal_(self.pos_embed, std=0.02)

    def _missing_pretrained_file(self) -> Optional[str]:
        """The configured local ``Pretrained`` checkpoint when that file does not exist, or None."""
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'):
            return None
        path = self.init_cfg.get('checkpoint')
        if not isinstance(path, str) or '://' in path or os.path.isfile(os.path.expanduser(path)):
            return None
        return path

    def _check_pretrained_file(self) -> None:
        # mmengine would only say "Checkpoint file ... does not exist" from deep inside
        # init_weights; the fix (download Meta's weights, convert them) is specific to this class.
        path = self._missing_pretrained_file()
        if path is None:
            return
        size = {384: 's', 768: 'b', 1024: 'l', 1536: 'g'}.get(self.embed_dims, 'b')
        reg = '_reg4' if self.num_register_tokens else ''
        raise FileNotFoundError(
            f'Pretrained DINOv2 checkpoint {path!r} (model.backbone.init_cfg.checkpoint) does not '
            f"exist. Get Meta's DINOv2 weights (https://github.com/facebookresearch/dinov2, e.g. "
            f'dinov2_vit{size}14{reg}_pretrain.pth) and convert them once: `python '
            f'tools/convert_weights.py dinov2_vit{size}14{reg}_pretrain.pth {path} --format '
            f'meta-dinov2 --patch-size {self.patch_size}` (README "Pretrained weights"); or set '
            f'model.backbone.init_cfg=None to train from a random initialisation.')

    def resized_pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        """Position embedding for a patch grid ``hw``: ``[1, h*w, C]`` (patch tokens only)."""
        return resize_pos_embed_grid(self.pos_embed, self.patch_resolution, hw,
                                     mode=self.interpolate_mode,
                                     antialias=self.pos_embed_antialias)

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patchify and add position embeddings.

        Args:
            x: Images ``[B, in_channels, H, W]``; H and W must be multiples of ``patch_size``.

        Returns:
            ``(tokens, (h, w))``: tokens ``[B, 1 + R + h*w, C]`` ordered CLS, registers, patches
            (only patches get a position embedding), and the patch grid size.
        """
        tokens, hw = self.patch_tokens(x)
        tokens = self.prepend_prefix_tokens(tokens + self.resized_pos_embed(hw))
        return self.pre_norm(tokens), hw

    def patch_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patchify images: ``[B, in_channels, H, W] -> ([B, h*w, C], (h, w))``.

        Raises ``ValueError`` for inputs that are not 4-D or whose sides are not multiples of the
        patch size (the message suggests the nearest crop).
        """
        if x.ndim != 4:
            raise ValueError(f'expected images [B, C, H, W], got shape {tuple(x.shape)}')
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f'input size {height}x{width} is not a multiple of the patch size '
                             f'{self.patch_size}; resize or pad the image (e.g. a crop of '
                             f'{height // self.patch_size * self.patch_size}x'
                             f'{width // self.patch_size * self.patch_size})')
        tokens, hw = self.patch_embed(x)
        return tokens, (hw[0], hw[1])  # sizes stay symbolic under torch.export (dynamic ONNX)

    def prepend_prefix_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, h*w, C]`` patch tokens -> ``[B, 1 + R + h*w, C]``: CLS, registers, patches.

        The dropout after the position embedding (``drop_rate``) applies to the whole sequence.
        """
        prefix = [self.cls_token.expand(tokens.shape[0], -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(tokens.shape[0], -1, -1))
        return self.drop_after_pos(torch.cat(prefix + [tokens], dim=1))

    def forward_block(self,
                      index: int,
                      x: torch.Tensor,
                      attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run encoder layer ``index`` on tokens ``x`` with an optional boolean attention mask.

        Computes ``x + ls1(attn(norm1(x), mask))`` then ``x + ls2(ffn(norm2(x)))`` with the layer's
        own modules (``attn.qkv`` / ``attn.proj`` / FFN linears are called as modules, so LoRA
        wrappers apply) and ``F.scaled_dot_product_attention``.

        Args:
            index: Layer index in ``[-num_layers, num_layers)``.
            x: Tokens ``[B, N, C]``.
            attn_mask: ``None`` or a bool tensor broadcastable as ``[B | 1, heads | 1, N, N]``;
                True = may attend.

        Returns:
            Tokens ``[B, N, C]``.
        """
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f'layer index {index} out of range for {self.num_layers} layers')
        layer = self.layers[index]
        attn = layer.attn
        batch, num_tokens, channels = x.shape
        check_attn_mask(attn_mask, batch, self.num_heads, num_tokens)
        q, k, v = split_heads(attn.qkv(layer.ln1(x)), attn.num_heads)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask,
            dropout_p=attn.attn_drop if self.training else 0.)
        out = attn.proj(out.transpose(1, 2).reshape(batch, num_tokens, channels))
        x = x + attn.out_drop(attn.gamma1(attn.proj_drop(out)))
        # mmcv FFN / mmpretrain SwiGLUFFN: identity + drop_path(gamma2(mlp(ln2(x)))).
        return layer.ffn(layer.ln2(x), identity=x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """mmpretrain-style forward: a tuple with one output per ``out_indices`` entry."""
        x, hw = self.embed(x)
        outs = []
        for i in range(self.num_layers):
            x = self.forward_block(i, x)
            if i == self.num_layers - 1:
                x = self.final_norm(x)
            if i in self.out_indices:
                outs.append(self._format_output(x, hw))
        return tuple(outs)

    def train(self, mode: bool = True) -> 'DINOv2':
        """Set train/eval mode; frozen stages stay in eval mode (no dropout / drop path).

        mmpretrain's ``BaseBackbone.train`` returns None and lets ``train()`` re-enable dropout in
        frozen stages; this returns ``self`` like ``nn.Module.train`` and re-freezes them.
        """
        super().train(mode)
        if mode and self.frozen_stages > 0:
            self._freeze_stages()
        return self

    def _freeze_stages(self) -> None:
        super()._freeze_stages()
        if self.register_tokens is not None:
            self.register_tokens.requires_grad = False

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer depth for mmpretrain's ``LearningRateDecayOptimWrapperConstructor``.

        Chosen so the constructor's ``lr * rate ** (max_depth - depth - 1)`` reproduces the EoMT
        reference's layer-wise decay: layer ``i`` gets ``rate ** (L - 1 - i)``; the embeddings
        (patch embed, pos embed, CLS and register tokens) get the same, smallest, lr as layer 0;
        the final norm and everything outside the backbone get the full lr. (mmpretrain's own ViT
        puts the embeddings one step below layer 0 and the last layer one step below full lr.)

        Args:
            param_name: Parameter name as seen by the constructor (e.g. ``backbone.layers.3...``).
            prefix: Prefix of this backbone's parameters (e.g. ``'backbone.'``); names without it
                belong to heads and get the full lr.

        Returns:
            ``(depth, max_depth)`` with ``max_depth = num_layers + 1``.
        """
        max_depth = self.num_layers + 1
        if not param_name.startswith(prefix):
            return max_depth - 1, max_depth
        name = param_name[len(prefix):]
        if name.startswith('layers.'):
            return int(name.split('.')[1]) + 1, max_depth
        if name.split('.')[0] in ('cls_token', 'register_tokens', 'pos_embed', 'patch_embed',
                                  'pre_norm'):
            return 1, max_depth
        return max_depth - 1, max_depth

    # Registered by mmpretrain's __init__ as a load_state_dict pre-hook (bound by name, so this
    # override is the one that runs).
    def _prepare_pos_embed(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Adapt a state dict in this module's format before loading; refuse ones that don't fit.

        See :func:`eomt_mm.models.backbones.dinov2_loading.fit_dinov2_state_dict`.
        """
        fit_dinov2_state_dict(self, state_dict, prefix)
