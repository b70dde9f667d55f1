"""DINOv3 ViT (Siméoni et al., 2025) on top of this project's :class:`DINOv2` / mmpretrain's ViT.

:class:`~.dinov2.DINOv2` (through it mmpretrain's ``VisionTransformer``) provides the patch
embedding, encoder layers, layer scale, drop path, CLS + register tokens, final LayerNorm, output
formatting, freezing, ``get_layer_depth``, ``final_norm`` and ``num_prefix_tokens``. What DINOv3
differs in and this class adds:

* no learned position table (``pos_embed`` is None): 2-D RoPE (:mod:`.rope`, base 100, coordinates
  normalised per axis) rotates queries and keys of the LAST ``h*w`` tokens only (CLS, registers
  and EoMT's prepended queries get none), computed per forward from the patch grid in
  :meth:`embed`; no buffer (transformers derives it from ``rope_theta``; the converters drop
  Meta's bf16 ``rope_embed.periods``); any input whose sides are multiples of 16 works;
* train-time coordinate augmentations ``pos_embed_shift`` / ``_jitter`` / ``_rescale``, in
  training mode only. Defaults None / None / 2.0 = Meta's hub (``pos_embed_rope_rescale_coords=2``,
  facebookresearch/dinov3 ``dinov3/hub/backbones.py``) and transformers' ``facebook/dinov3-*``
  configs (``DINOv3ViTConfig``), i.e. what fine-tuning transformers' ``DINOv3ViTModel`` applies:
  only a random rescale in [1/2, 2];
* no key bias: the fused ``qkv`` (so DINOv2's LoRA targets and q/v slices apply) keeps one bias
  (Meta stores a masked one; transformers: ``key_bias=False``) whose key part ``[C:2C]`` stays
  zero: zeroed at construction, after ``init_weights`` and in loaded state dicts; a hook (which
  :meth:`forward_block` re-attaches to a new parameter, e.g. after LoRA) zeroes its gradient;
* Meta's arch presets (``_DINOV3_ARCHS``), LayerNorm eps 1e-5, layer-scale init 1e-5, 4 registers.

State-dict keys (this module's own format; ``C`` = embed_dims, ``F`` = feedforward_channels,
``F'`` = ``(int(2F/3) + 7) // 8 * 8`` for SwiGLU)::

    cls_token                                   [1, 1, C]
    register_tokens                             [1, R, C]      (absent when R = 0)
    patch_embed.projection.{weight,bias}        [C, 3, 16, 16], [C]
    layers.{i}.ln1.{weight,bias}                [C]
    layers.{i}.attn.qkv.{weight,bias}           [3C, C], [3C]  (rows q, k, v; bias[C:2C] == 0;
                                                                no bias for 7B)
    layers.{i}.attn.proj.{weight,bias}          [C, C], [C]
    layers.{i}.attn.gamma1.weight               [C]            (layer scale 1)
    layers.{i}.ln2.{weight,bias}                [C]
    layers.{i}.ffn.layers.0.0.{weight,bias}     [F, C], [F]    (plain MLP: fc1)
    layers.{i}.ffn.layers.1.{weight,bias}       [C, F], [C]    (plain MLP: fc2)
    layers.{i}.ffn.w12.{weight,bias}            [2F', C]       (SwiGLU: rows [gate; value])
    layers.{i}.ffn.w3.{weight,bias}             [C, F'], [C]   (SwiGLU: output)
    layers.{i}.ffn.gamma2.weight                [C]            (layer scale 2)
    ln1.{weight,bias}                           [C]            (final norm)

No buffers, no ``pos_embed``. Loading refuses (``ValueError``) a position table, Meta's or
transformers' raw layouts, another layer count, missing/unexpected registers and any shape
mismatch (a patch kernel of another size too: nothing is resampled).
"""
import re
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmseg.registry import MODELS

from ..utils.attention import check_attn_mask, split_heads
from .dinov2 import DINOv2
from .dinov2_loading import raise_misfit, structural_problems
from .rope import augment_coords, patch_center_coords, rope_cos_sin, rotate_patch_tokens

# Meta's hub (dinov3/hub/backbones.py): embed_dim, depth, num_heads, ffn_ratio * embed_dim,
# ffn_layer. mmpretrain's SwiGLUFFNFused turns F into (int(2F/3) + 7) // 8 * 8 hidden channels,
# Meta's SwiGLUFFN rounds int(2F/3) up to a multiple of 8 (64 for 7B): the same numbers
# (S+: 1536, L+: 4096, H+: 5120, 7B: 8192 = transformers' intermediate_size).
_SWIGLU = dict(ffn_type='swiglu_fused')
_DINOV3_ARCHS = {
    's': dict(embed_dims=384, num_layers=12, num_heads=6, feedforward_channels=1536),
    's+': dict(embed_dims=384, num_layers=12, num_heads=6, feedforward_channels=2304, **_SWIGLU),
    'b': dict(embed_dims=768, num_layers=12, num_heads=12, feedforward_channels=3072),
    'l': dict(embed_dims=1024, num_layers=24, num_heads=16, feedforward_channels=4096),
    'l+': dict(embed_dims=1024, num_layers=24, num_heads=16, feedforward_channels=6144, **_SWIGLU),
    'h+': dict(embed_dims=1280, num_layers=32, num_heads=20, feedforward_channels=7680, **_SWIGLU),
    '7b': dict(embed_dims=4096, num_layers=40, num_heads=32, feedforward_channels=12288,
               qkv_bias=False, **_SWIGLU),
}
# Short name -> (long names, Meta's hub name used in its file names).
_ARCH_NAMES = {'s': (('small', ), 'vits16'), 's+': (('small-plus', 'splus'), 'vits16plus'),
               'b': (('base', ), 'vitb16'), 'l': (('large', ), 'vitl16'),
               'l+': (('large-plus', 'lplus'), 'vitl16plus'),
               'h+': (('huge-plus', 'hplus'), 'vith16plus'), '7b': ((), 'vit7b16')}
_ARCH_KEYS = {'embed_dims', 'num_layers', 'num_heads', 'feedforward_channels', 'ffn_type',
              'qkv_bias'}
# Keys that identify a checkpoint in a layout other than this module's (error hints).
_FOREIGN_KEYS = [
    (r'pos_embed', 'a learned position table (DINOv2 / ViT layout); DINOv3 uses RoPE and has '
     'none: build a DINOv2 backbone for this file'),
    (r'(rope_embed\.periods|storage_tokens|mask_token|blocks\.\d+\..*|.*\.bias_mask)',
     "Meta's DINOv3 layout: convert it with `tools/convert_weights.py SRC DST --format "
     'meta-dinov3`'),
    (r'embeddings\..*|layer\.\d+\..*', "transformers' DINOv3ViTModel layout: convert it with "
     '`tools/convert_weights.py SRC DST --format hf-dinov3`'),
]


@torch.utils.hooks.unserializable_hook
def _zero_key_bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook on a fused qkv bias: the key rows get no update (DINOv3 has no key bias)."""
    channels = grad.shape[0] // 3
    grad = grad.clone()
    grad[channels:2 * channels] = 0
    return grad


def _mask_key_bias_grad(qkv: nn.Linear) -> None:
    """Attach :func:`_zero_key_bias_grad` to ``qkv.bias`` once (a new parameter gets it anew)."""
    bias = qkv.bias
    if bias is not None and bias.requires_grad and not getattr(bias, '_dinov3_key_masked', False):
        bias.register_hook(_zero_key_bias_grad)
        bias._dinov3_key_masked = True


@MODELS.register_module()
class DINOv3(DINOv2):
    """DINOv3 Vision Transformer: RoPE, 4 register tokens, layer scale, no key bias.

    Args:
        arch: ``'s' | 's+' | 'b' | 'l' | 'l+' | 'h+' | '7b'`` (also ``'small'``, ``'huge-plus'``,
            Meta's ``'vitb16'`` / ``'vith16plus'``..., optionally prefixed ``'dinov3-'``) or a
            dict with ``embed_dims``, ``num_layers``, ``num_heads``, ``feedforward_channels``
            and optionally ``ffn_type`` (``'origin'`` = GELU MLP, ``'swiglu_fused'`` = SwiGLU,
            ``ffn.w12`` / ``ffn.w3``) and ``qkv_bias``.
        img_size: Nominal size for mmpretrain's patch embedding; it sizes nothing: any input
            whose sides are multiples of ``patch_size`` works.
        patch_size: Patch size (16 for every released DINOv3 ViT).
        num_register_tokens: Register ("storage") tokens, 4 in every released DINOv3 ViT.
        in_channels: Number of input image channels.
        out_indices: Layers whose output :meth:`forward` returns (mmpretrain semantics).
        drop_rate: Dropout after the embedding and inside the layers.
        drop_path_rate: Stochastic depth rate (mmpretrain's SwiGLU FFN has no drop path).
        qkv_bias: Whether the fused qkv has a bias (key part always zero); None = the arch's
            value (True; False for 7B).
        norm_cfg: Norm layer config (DINOv3: LayerNorm eps 1e-5).
        final_norm: Must be True (exposed as :meth:`final_norm`).
        out_type: ``'featmap'``, ``'raw'``, ``'cls_token'`` or ``'avg_featmap'``.
        with_cls_token: Must be True.
        frozen_stages: Freeze embeddings and the first ``frozen_stages`` layers (-1: none).
        layer_scale_init_value: Initial layer-scale value (Meta's hub: 1e-5).
        rope_base: RoPE base period (DINOv3: 100).
        pos_embed_shift: Training only: add a uniform value in ``[-shift, shift]`` per axis
            (None = off, the hub default).
        pos_embed_jitter: Training only: scale each axis by a log-uniform factor in
            ``[1/jitter, jitter]`` (None = off, the hub default).
        pos_embed_rescale: Training only: scale both axes by one log-uniform factor in
            ``[1/rescale, rescale]`` (2.0 = the hub default; None = off).
        patch_cfg: Extra config for the mmcv ``PatchEmbed``.
        layer_cfgs: Extra config for every (dict) or each (list) encoder layer.
        init_cfg: mmengine init config, e.g. ``dict(type='Pretrained', checkpoint=PATH,
            prefix='backbone.')`` for a file written by ``tools/convert_weights.py``.
    """

    arch_zoo = {alias: _DINOV3_ARCHS[short] for short, (longs, hub) in _ARCH_NAMES.items()
                for name in (short, hub) + longs for alias in (name, f'dinov3-{name}')}

    def __init__(self, arch: str | dict = 'b', img_size: int | Sequence[int] = 224,
                 patch_size: int = 16, num_register_tokens: int = 4, in_channels: int = 3,
                 out_indices: int | Sequence[int] = -1, drop_rate: float = 0.,
                 drop_path_rate: float = 0., qkv_bias: Optional[bool] = None,
                 norm_cfg: dict = dict(type='LN', eps=1e-5), final_norm: bool = True,
                 out_type: str = 'featmap', with_cls_token: bool = True,
                 frozen_stages: int = -1, layer_scale_init_value: float = 1e-5,
                 rope_base: float = 100.0, pos_embed_shift: Optional[float] = None,
                 pos_embed_jitter: Optional[float] = None,
                 pos_embed_rescale: Optional[float] = 2.0, patch_cfg: dict = dict(),
                 layer_cfgs: dict | Sequence[dict] = dict(), init_cfg: Optional[dict] = None):
        if isinstance(arch, str):
            if arch.lower() not in self.arch_zoo:
                raise ValueError(f'Unknown DINOv3 arch {arch!r}; expected one of '
                                 f'{sorted(self.arch_zoo)} or a dict')
            settings = dict(self.arch_zoo[arch.lower()])
        elif isinstance(arch, dict):
            if not _ARCH_KEYS - {'ffn_type', 'qkv_bias'} <= set(arch) <= _ARCH_KEYS:
                raise ValueError(f'Custom DINOv3 arch dict needs keys embed_dims, num_layers, '
                                 f'num_heads, feedforward_channels (optional: ffn_type, '
                                 f'qkv_bias), got {sorted(arch)}')
            settings = dict(arch)
        else:
            raise TypeError(f'arch must be a str or dict, got {type(arch).__name__}')
        arch_qkv_bias = settings.pop('qkv_bias', True)
        qkv_bias = arch_qkv_bias if qkv_bias is None else qkv_bias
        if not final_norm:
            raise ValueError('DINOv3 always has a final LayerNorm: final_norm must be True')
        if not with_cls_token:
            raise ValueError('DINOv3 always has a CLS token: with_cls_token must be True')
        heads = settings['num_heads']
        if settings['embed_dims'] % heads or (settings['embed_dims'] // heads) % 4:
            raise ValueError(f"embed_dims {settings['embed_dims']} / num_heads {heads} must be a "
                             'head width divisible by 4 (2-D RoPE rotates y and x channel pairs)')
        if pos_embed_shift is not None and not pos_embed_shift >= 0:
            raise ValueError(f'pos_embed_shift must be None or >= 0, got {pos_embed_shift!r}')
        for name, value in (('pos_embed_jitter', pos_embed_jitter),
                            ('pos_embed_rescale', pos_embed_rescale)):
            if value is not None and not value >= 1:
                raise ValueError(f'{name} must be None or >= 1 (a log-uniform factor in '
                                 f'[1/{name[10:]}, {name[10:]}]), got {value!r}')
        if not rope_base > 0:
            raise ValueError(f'rope_base must be > 0, got {rope_base!r}')

        # DINOv2 validates the rest and builds mmpretrain's ViT; freezing comes last.
        super().__init__(
            arch=settings, img_size=img_size, patch_size=patch_size,
            num_register_tokens=num_register_tokens, in_channels=in_channels,
            out_indices=out_indices, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            qkv_bias=qkv_bias, norm_cfg=norm_cfg, final_norm=True, out_type=out_type,
            with_cls_token=True, frozen_stages=-1, layer_scale_init_value=layer_scale_init_value,
            patch_cfg=patch_cfg, layer_cfgs=layer_cfgs, pre_norm=False, init_cfg=init_cfg)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        # No learned table: mmpretrain's forward / freezing / init skip a None pos_embed.
        self.pos_embed = None
        self.head_dims = self.embed_dims // self.num_heads
        self.rope_base = float(rope_base)
        self.pos_embed_shift, self.pos_embed_jitter, self.pos_embed_rescale = (
            pos_embed_shift, pos_embed_jitter, pos_embed_rescale)
        self._rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (cos, sin) of embed()
        self._zero_key_bias()
        self.frozen_stages = frozen_stages
        if frozen_stages > 0:
            self._freeze_stages()

    # ------------------------------------------------------------------------- key bias
    @torch.no_grad()
    def _zero_key_bias(self) -> None:
        """Set the key part of every fused qkv bias to zero and mask its gradient."""
        for layer in self.layers:
            qkv = layer.attn.qkv
            if qkv.bias is not None:
                qkv.bias[self.embed_dims:2 * self.embed_dims].zero_()
                _mask_key_bias_grad(qkv)

    def init_weights(self) -> None:
        """mmpretrain's random init, CLS and registers N(0, 0.02) as Meta's, unless ``init_cfg`` is
        Pretrained (a missing local file raises ``FileNotFoundError`` saying how to convert
        DINOv3 weights); the key bias ends at zero either way."""
        self._check_pretrained_file()
        # Skip DINOv2.init_weights (it initialises a position table this class does not have).
        super(DINOv2, self).init_weights()
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'):
            nn.init.normal_(self.cls_token, std=0.02)
            if self.register_tokens is not None:
                nn.init.normal_(self.register_tokens, std=0.02)
        self._zero_key_bias()

    def _check_pretrained_file(self) -> None:
        # As DINOv2's, with DINOv3's weights and converter formats in the message.
        path = self._missing_pretrained_file()
        if path is None:
            return
        hub = next((hub for short, (_, hub) in _ARCH_NAMES.items() if _DINOV3_ARCHS[short]
                    is self.arch_zoo.get(str(self.arch_name).lower())), 'vitb16')
        raise FileNotFoundError(
            f'Pretrained DINOv3 checkpoint {path!r} (model.backbone.init_cfg.checkpoint) does not '
            f"exist. Get Meta's DINOv3 weights (https://github.com/facebookresearch/dinov3, e.g. "
            f'dinov3_{hub}_pretrain_lvd1689m-*.pth) and convert them once: `python '
            f'tools/convert_weights.py dinov3_{hub}_pretrain_lvd1689m-*.pth {path} --format '
            f'meta-dinov3` (or a transformers facebook/dinov3-* model.safetensors with --format '
            f'hf-dinov3; README "Pretrained weights"); or set model.backbone.init_cfg=None to '
            f'train from a random initialisation.')

    # ------------------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patchify, prepend CLS and registers, and build this forward pass's RoPE tables.

        The tables (grid coordinates, augmented when ``self.training``) serve the
        :meth:`forward_block` calls until the next ``embed``; activation checkpointing recomputes
        blocks with the latest ones, so with augmentations on run a forward's backward before
        embedding the next batch (as training loops do).

        Args:
            x: Images ``[B, in_channels, H, W]``; H and W must be multiples of ``patch_size``.

        Returns:
            ``(tokens, (h, w))``: tokens ``[B, 1 + R + h*w, C]`` ordered CLS, registers,
            patches (no position is added to any token), and the patch grid size.
        """
        tokens, hw = self.patch_tokens(x)
        tokens = self.prepend_prefix_tokens(tokens)
        coords = patch_center_coords(hw[0], hw[1], device=x.device)
        if self.training:
            coords = augment_coords(coords, self.pos_embed_shift, self.pos_embed_jitter,
                                    self.pos_embed_rescale)
        self._rope = rope_cos_sin(coords, self.head_dims, self.rope_base)
        return tokens, hw

    def forward_block(self,
                      index: int,
                      x: torch.Tensor,
                      attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run encoder layer ``index`` on tokens ``x`` with an optional boolean attention mask.

        ``x + ls1(attn(norm1(x), mask))`` then ``x + ls2(ffn(norm2(x)))`` with the layer's own
        modules (called as modules, so LoRA wrappers apply); RoPE rotates queries and keys of the
        last ``h*w`` tokens (the grid of the latest :meth:`embed`); SDPA attends.

        Args:
            index: Layer index in ``[-num_layers, num_layers)``.
            x: Tokens ``[B, N, C]`` ending with the ``h*w`` patch tokens of the latest
                :meth:`embed` (anything in front of them, e.g. EoMT's queries, gets no RoPE).
            attn_mask: ``None`` or a bool tensor broadcastable as ``[B | 1, heads | 1, N, N]``;
                True = may attend.

        Returns:
            Tokens ``[B, N, C]``.
        """
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f'layer index {index} out of range for {self.num_layers} layers')
        batch, num_tokens, channels = x.shape
        if self._rope is None:
            raise RuntimeError('DINOv3.forward_block needs the RoPE tables: call embed() first')
        cos, sin = self._rope
        if num_tokens - cos.shape[0] < self.num_prefix_tokens:
            raise ValueError(f'{num_tokens} tokens cannot hold CLS, registers and the '
                             f'{cos.shape[0]} patches of the latest embed(): embed these first')
        check_attn_mask(attn_mask, batch, self.num_heads, num_tokens)
        layer, attn = self.layers[index], self.layers[index].attn
        if torch.is_grad_enabled():
            _mask_key_bias_grad(attn.qkv)
        # RoPE writes new q and k; only v needs packing for the attention kernel.
        q, k, v = split_heads(attn.qkv(layer.ln1(x)), attn.num_heads, pack=(False, False, True))
        q, k = rotate_patch_tokens(q, cos, sin), rotate_patch_tokens(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop if self.training else 0.)
        out = attn.proj(out.transpose(1, 2).reshape(batch, num_tokens, channels))
        x = x + attn.out_drop(attn.gamma1(attn.proj_drop(out)))
        # mmcv FFN / mmpretrain SwiGLUFFN: identity + drop_path(gamma2(mlp(ln2(x)))).
        return layer.ffn(layer.ln2(x), identity=x)

    # ------------------------------------------------------------------------- loading
    # Registered by mmpretrain's __init__ as a load_state_dict pre-hook (bound by name, so this
    # override is the one that runs).
    def _prepare_pos_embed(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Check a state dict in this module's format before loading; zero its key biases.

        Raises ``ValueError`` for a learned position table, Meta's / transformers' raw layouts,
        another layer count, missing/unexpected register tokens or any shape mismatch (mmengine
        would otherwise only warn and keep the random weights).
        """
        own_keys = [k for k in state_dict if k.startswith(prefix)]
        if not own_keys:
            return
        problems = []
        for key in own_keys:
            for pattern, hint in _FOREIGN_KEYS:
                if re.fullmatch(pattern, key[len(prefix):]):
                    problems.append(f'{key} is {hint}')
                    break
        problems += structural_problems(
            self, state_dict, prefix, dict(self.named_parameters()),
            shape_hints={'patch_embed.projection.weight':
                         ' (DINOv3 is patch 16 natively; patch kernels are not resampled)'})
        raise_misfit(self, problems)
        # DINOv3 has no key bias (Meta's masked qkv bias may store arbitrary, unused values there).
        channels, nonzero = self.embed_dims, 0
        for i in range(self.num_layers):
            name = f'{prefix}layers.{i}.attn.qkv.bias'
            bias = state_dict.get(name)
            if bias is not None and bias[channels:2 * channels].any():
                state_dict[name] = torch.cat(
                    [bias[:channels], torch.zeros_like(bias[:channels]), bias[2 * channels:]])
                nonzero += 1
        if nonzero:
            MMLogger.get_current_instance().info(
                f'DINOv3: zeroed the unused key part of the qkv bias in {nonzero} layers')
