"""Convert DINOv2 / EoMT checkpoints users already have into this project's format.

Supported sources (``--format``):

* ``meta-dinov2``: Meta's hub files (``dinov2_vitb14_reg4_pretrain.pth``): ``cls_token``,
  ``register_tokens``, ``mask_token``, CLS-inclusive ``pos_embed``, ``blocks.{i}.*`` (giant:
  ``mlp.w12`` / ``mlp.w3``), ``norm.*``.
* ``timm``: timm ``vit_*_reg4_dinov2`` state dicts: ``reg_token``, patch-only ``pos_embed``
  (``no_embed_class``: the CLS position is already folded into ``cls_token``).
* ``eomt``: official EoMT (Lightning) checkpoints: prefix ``network.``, backbone under
  ``encoder.backbone.`` (timm names), ``q.weight``, ``class_head``, ``mask_head.{0,2,4}``,
  ``upscale.{i}.conv1|conv2|norm``, ``attn_mask_probs``.
* ``hf-eomt``: Hugging Face ``EomtForUniversalSegmentation``: ``embeddings.*``, separate
  ``attention.{q,k,v}_proj`` (fused here into ``qkv``), ``layer_scale{1,2}.lambda1``, ``layernorm``,
  ``query.weight``, ``class_predictor``, ``mask_head.fc{1,2,3}``, ``upscale_block.block.{i}``.

Internal convention (the target): backbone keys are :class:`~eomt_mm.models.backbones.DINOv2`'s
own ``state_dict`` keys prefixed ``backbone.``; ``pos_embed`` covers the patch grid only and the
source's CLS position embedding (Meta layout) is added into ``cls_token``, exactly like timm's
``no_embed_class`` models and the EoMT reference. Register tokens get no position embedding.
EoMT decoder keys follow :data:`DECODER_KEY_MAP` (one table, kept next to the decoder's names).

Every source key must be mapped or explicitly skipped (with a reason that is printed); the
converted backbone is checked key-by-key and shape-by-shape against a ``DINOv2`` built (on the
``meta`` device) from the inferred architecture. Anything else raises
:class:`CheckpointConversionError` listing the offending keys. Sources are read with
``torch.load(weights_only=True)`` or safetensors; the output is written atomically as
``{'state_dict': ..., 'meta': {...}}`` (weights-only loadable).
"""
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .resample import resample_patch_kernel, resize_pos_embed_grid

FORMATS = ('meta-dinov2', 'timm', 'eomt', 'hf-eomt')
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

StateDict = Dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# EoMT decoder key table: canonical (official EoMT, without ``network.``) -> this project's keys.
# The targets are the state_dict names of eomt_mm.models.segmentors.EoMT, whose `decoder`
# attribute is an eomt_mm.models.decode_heads.EoMTDecoder. Conversion builds that decoder and
# refuses to write a file whose decoder keys or shapes differ, so a rename there shows up here.
# Patterns are full-match regexes; ``{i}`` groups are substituted positionally.
# ---------------------------------------------------------------------------------------------
DECODER_KEY_MAP: List[Tuple[str, str]] = [
    (r'q\.weight', 'decoder.q.weight'),
    (r'class_head\.(weight|bias)', r'decoder.class_head.\1'),
    (r'mask_head\.(0|2|4)\.(weight|bias)', r'decoder.mask_head.\1.\2'),
    (r'upscale\.(\d+)\.conv1\.(weight|bias)', r'decoder.upscale.\1.conv1.\2'),
    (r'upscale\.(\d+)\.conv2\.weight', r'decoder.upscale.\1.conv2.weight'),
    (r'upscale\.(\d+)\.norm\.(weight|bias)', r'decoder.upscale.\1.norm.\2'),
    (r'attn_mask_probs', 'decoder.attn_mask_probs'),
]

# timm DINOv2 names -> DINOv2 (mmpretrain) names. ``{fc1}`` / ``{fc2}`` depend on the FFN type.
_BACKBONE_RULES: List[Tuple[str, str]] = [
    (r'cls_token', 'cls_token'),
    (r'reg_token', 'register_tokens'),
    (r'pos_embed', 'pos_embed'),
    (r'patch_embed\.proj\.(weight|bias)', r'patch_embed.projection.\1'),
    (r'blocks\.(\d+)\.norm1\.(weight|bias)', r'layers.\1.ln1.\2'),
    (r'blocks\.(\d+)\.attn\.qkv\.(weight|bias)', r'layers.\1.attn.qkv.\2'),
    (r'blocks\.(\d+)\.attn\.proj\.(weight|bias)', r'layers.\1.attn.proj.\2'),
    (r'blocks\.(\d+)\.ls1\.gamma', r'layers.\1.attn.gamma1.weight'),
    (r'blocks\.(\d+)\.norm2\.(weight|bias)', r'layers.\1.ln2.\2'),
    (r'blocks\.(\d+)\.mlp\.fc1\.(weight|bias)', r'layers.\1.ffn.{fc1}.\2'),
    (r'blocks\.(\d+)\.mlp\.fc2\.(weight|bias)', r'layers.\1.ffn.{fc2}.\2'),
    (r'blocks\.(\d+)\.ls2\.gamma', r'layers.\1.ffn.gamma2.weight'),
    (r'norm\.(weight|bias)', r'ln1.\1'),
]
_FFN_NAMES = {'origin': dict(fc1='layers.0.0', fc2='layers.1'),
              'swiglu_fused': dict(fc1='w12', fc2='w3')}


class CheckpointConversionError(ValueError):
    """A checkpoint does not fit the requested format / architecture."""


@dataclass
class ConversionReport:
    """What a conversion did, for printing and for tests."""
    mapped: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f'mapped {len(self.mapped)} tensors:']
        lines += [f'  {src} -> {dst}' for src, dst in self.mapped]
        if self.skipped:
            lines.append(f'skipped {len(self.skipped)} tensors:')
            lines += [f'  {src}: {why}' for src, why in self.skipped]
        lines += [f'note: {n}' for n in self.notes]
        return '\n'.join(lines)


# ----------------------------------------------------------------------------------- loading
def load_source_state_dict(path: str) -> StateDict:
    """Read a checkpoint file without arbitrary unpickling.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A top-level ``state_dict`` / ``model`` / ``teacher``
    entry (Lightning, mmengine, DINOv2 training checkpoints) is unwrapped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors ships with the test extras
            raise ImportError('reading .safetensors needs the safetensors package') from exc
        obj = load_file(path, device='cpu')
    else:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as exc:
            raise CheckpointConversionError(
                f'{path} cannot be read with torch.load(weights_only=True) ({exc}). Checkpoints '
                f'are never unpickled with arbitrary code; re-save its state_dict only, e.g. '
                f"torch.save(torch.load(path, weights_only=False)['state_dict'], new_path) in a "
                f'trusted environment.') from exc
    for key in ('state_dict', 'model', 'teacher'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointConversionError(f'{path} does not contain a state dict')
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointConversionError(f'{path}: non-tensor entries {bad[:10]} in the state dict')
    return dict(obj)


# ------------------------------------------------------------------- source -> timm-like names
def _strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _from_meta(sd: StateDict, report: ConversionReport) -> StateDict:
    sd = dict(sd)
    if 'cls_token' not in sd or 'pos_embed' not in sd:
        raise CheckpointConversionError('not a Meta DINOv2 checkpoint: needs cls_token and '
                                        f'pos_embed, found keys {sorted(sd)[:8]}...')
    if 'mask_token' in sd:
        sd.pop('mask_token')
        report.skipped.append(('mask_token', 'DINOv2 pre-training only (iBOT masking)'))
    pos = sd.pop('pos_embed')
    side = math.isqrt(pos.shape[1] - 1)
    if pos.ndim != 3 or side * side != pos.shape[1] - 1:
        raise CheckpointConversionError(
            f'Meta pos_embed must be [1, 1 + h*w, C] with a square grid (CLS position first), '
            f'got {tuple(pos.shape)}')
    # Fold the CLS position into the token (timm no_embed_class / EoMT convention).
    out = {'cls_token': sd.pop('cls_token') + pos[:, :1], 'pos_embed': pos[:, 1:]}
    report.notes.append('added the CLS position embedding (pos_embed[:, 0]) into cls_token; '
                        'pos_embed now covers patches only')
    if 'register_tokens' in sd:
        out['reg_token'] = sd.pop('register_tokens')
    for key, value in sd.items():
        key = re.sub(r'^(blocks\.\d+\.mlp)\.w12\.', r'\1.fc1.', key)
        key = re.sub(r'^(blocks\.\d+\.mlp)\.w3\.', r'\1.fc2.', key)
        out[key] = value
    return out


def _from_timm(sd: StateDict, report: ConversionReport) -> StateDict:
    if 'cls_token' not in sd or 'pos_embed' not in sd:
        raise CheckpointConversionError('not a timm ViT checkpoint: needs cls_token and pos_embed, '
                                        f'found keys {sorted(sd)[:8]}...')
    return dict(sd)


def _split_eomt(sd: StateDict, report: ConversionReport) -> Tuple[StateDict, StateDict]:
    """Official EoMT -> (timm backbone dict, canonical decoder dict)."""
    if not any(k.startswith('network.') for k in sd):
        raise CheckpointConversionError("not an official EoMT checkpoint: no 'network.' keys "
                                        f'(found {sorted(sd)[:8]}...)')
    backbone, decoder = {}, {}
    for key, value in sd.items():
        if key.startswith('network.encoder.backbone.'):
            backbone[key[len('network.encoder.backbone.'):]] = value
        elif key in ('network.encoder.pixel_mean', 'network.encoder.pixel_std'):
            expected = IMAGENET_MEAN if key.endswith('mean') else IMAGENET_STD
            values = tuple(round(float(v), 4) for v in value.flatten())
            if values != tuple(round(v, 4) for v in expected):
                raise CheckpointConversionError(
                    f'{key} = {values} differs from ImageNet {expected}: normalisation lives in '
                    f"the config's data_preprocessor here; this checkpoint needs a matching one")
            report.skipped.append((key, f'normalisation {values} (x255) belongs to the '
                                        'SegDataPreProcessor'))
        elif key.startswith('network.'):
            decoder[key[len('network.'):]] = value
        elif key.startswith('criterion.'):
            report.skipped.append((key, 'loss buffer, rebuilt from the loss config'))
        else:
            raise CheckpointConversionError(f'unexpected key {key!r} in an EoMT checkpoint')
    return backbone, decoder


def _split_hf(sd: StateDict, report: ConversionReport) -> Tuple[StateDict, StateDict]:
    """HF EomtForUniversalSegmentation -> (timm backbone dict, canonical decoder dict)."""
    if all(k.startswith('model.') for k in sd):
        sd = _strip_prefix(sd, 'model.')
    if 'embeddings.cls_token' not in sd:
        raise CheckpointConversionError('not a Hugging Face EoMT checkpoint: no '
                                        f'embeddings.cls_token (found {sorted(sd)[:8]}...)')
    backbone, decoder = {}, {}
    fused: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    simple = [
        (r'embeddings\.cls_token', 'cls_token'),
        (r'embeddings\.register_tokens', 'reg_token'),
        (r'embeddings\.patch_embeddings\.projection\.(weight|bias)', r'patch_embed.proj.\1'),
        (r'layers\.(\d+)\.norm1\.(weight|bias)', r'blocks.\1.norm1.\2'),
        (r'layers\.(\d+)\.attention\.out_proj\.(weight|bias)', r'blocks.\1.attn.proj.\2'),
        (r'layers\.(\d+)\.layer_scale1\.lambda1', r'blocks.\1.ls1.gamma'),
        (r'layers\.(\d+)\.norm2\.(weight|bias)', r'blocks.\1.norm2.\2'),
        (r'layers\.(\d+)\.mlp\.fc1\.(weight|bias)', r'blocks.\1.mlp.fc1.\2'),
        (r'layers\.(\d+)\.mlp\.fc2\.(weight|bias)', r'blocks.\1.mlp.fc2.\2'),
        (r'layers\.(\d+)\.mlp\.down_proj\.(weight|bias)', r'blocks.\1.mlp.fc2.\2'),
        (r'layers\.(\d+)\.layer_scale2\.lambda1', r'blocks.\1.ls2.gamma'),
        (r'layernorm\.(weight|bias)', r'norm.\1'),
    ]
    decoder_rules = [
        (r'query\.weight', 'q.weight'),
        (r'class_predictor\.(weight|bias)', r'class_head.\1'),
        (r'mask_head\.fc1\.(weight|bias)', r'mask_head.0.\1'),
        (r'mask_head\.fc2\.(weight|bias)', r'mask_head.2.\1'),
        (r'mask_head\.fc3\.(weight|bias)', r'mask_head.4.\1'),
        (r'upscale_block\.block\.(\d+)\.conv1\.(weight|bias)', r'upscale.\1.conv1.\2'),
        (r'upscale_block\.block\.(\d+)\.conv2\.weight', r'upscale.\1.conv2.weight'),
        (r'upscale_block\.block\.(\d+)\.layernorm2d\.(weight|bias)', r'upscale.\1.norm.\2'),
        (r'attn_mask_probs', 'attn_mask_probs'),
    ]
    for key, value in sd.items():
        if key == 'embeddings.position_embeddings.weight':
            backbone['pos_embed'] = value[None]  # nn.Embedding [N, C] -> [1, N, C]
            continue
        if key.startswith('criterion.'):
            report.skipped.append((key, 'loss buffer, rebuilt from the loss config'))
            continue
        m = re.fullmatch(r'layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)', key)
        if m:  # fused below in q, k, v order (timm / mmpretrain qkv layout)
            fused.setdefault((f'blocks.{m.group(1)}.attn.qkv.{m.group(3)}', 'qkv'), {})[
                m.group(2)] = value
            continue
        m = re.fullmatch(r'layers\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)', key)
        if m:  # SwiGLU: w12 = [gate; up] because the FFN computes silu(first half) * second half
            fused.setdefault((f'blocks.{m.group(1)}.mlp.fc1.{m.group(3)}', 'swiglu'), {})[
                m.group(2)] = value
            continue
        for pattern, target, out in [(p, t, backbone) for p, t in simple] + [
                (p, t, decoder) for p, t in decoder_rules]:
            if re.fullmatch(pattern, key):
                out[re.sub(f'^{pattern}$', target, key)] = value
                break
        else:
            raise CheckpointConversionError(f'unexpected key {key!r} in a Hugging Face EoMT '
                                            'checkpoint')
    for (target, kind), parts in fused.items():
        order = ('q', 'k', 'v') if kind == 'qkv' else ('gate', 'up')
        missing = [p for p in order if p not in parts]
        if missing:
            raise CheckpointConversionError(f'{target}: missing {missing} projection(s) to fuse')
        backbone[target] = torch.cat([parts[p] for p in order], dim=0)
    report.notes.append('fused attention.{q,k,v}_proj into attn.qkv'
                        + (' and mlp.{gate,up}_proj into ffn.w12' if any(
                            k == 'swiglu' for _, k in fused) else ''))
    return backbone, decoder


# --------------------------------------------------------------------- timm-like -> ours
def infer_backbone_arch(timm_sd: StateDict) -> dict:
    """Infer the DINOv2 architecture (everything but the head count) from timm-named weights."""
    try:
        embed_dims = timm_sd['cls_token'].shape[-1]
        layer_ids = {int(m.group(1)) for k in timm_sd if (m := re.match(r'blocks\.(\d+)\.', k))}
        fc1 = timm_sd['blocks.0.mlp.fc1.weight']
        fc2 = timm_sd['blocks.0.mlp.fc2.weight']
        kernel = timm_sd['patch_embed.proj.weight']
    except KeyError as exc:
        raise CheckpointConversionError(f'backbone weights incomplete: {exc} missing') from exc
    if layer_ids != set(range(len(layer_ids))):
        raise CheckpointConversionError(f'backbone block indices are not contiguous: '
                                        f'{sorted(layer_ids)}')
    if fc1.shape[0] == 2 * fc2.shape[1]:
        hidden = fc2.shape[1]
        # Pick the constructor value that mmpretrain's SwiGLUFFNFused turns back into `hidden`.
        ffc = math.ceil(hidden * 3 / 2)
        if (int(ffc * 2 / 3) + 7) // 8 * 8 != hidden:
            raise CheckpointConversionError(f'SwiGLU hidden size {hidden} cannot be expressed '
                                            'by SwiGLUFFNFused (multiple of 8 needed)')
        ffn_type = 'swiglu_fused'
    elif fc1.shape[0] == fc2.shape[1]:
        ffc, ffn_type = fc1.shape[0], 'origin'
    else:
        raise CheckpointConversionError(f'cannot tell the FFN type from fc1 {tuple(fc1.shape)} and '
                                        f'fc2 {tuple(fc2.shape)}')
    if kernel.shape[-1] != kernel.shape[-2]:
        raise CheckpointConversionError(f'non-square patch kernel {tuple(kernel.shape)}')
    num_reg = timm_sd['reg_token'].shape[1] if 'reg_token' in timm_sd else 0
    return dict(embed_dims=int(embed_dims), num_layers=len(layer_ids),
                feedforward_channels=int(ffc), ffn_type=ffn_type,
                patch_size=int(kernel.shape[-1]), num_register_tokens=int(num_reg),
                in_channels=int(kernel.shape[1]))


def _rename_backbone(timm_sd: StateDict, ffn_type: str, report: ConversionReport) -> StateDict:
    names = _FFN_NAMES[ffn_type]
    out, unexpected = {}, []
    for key, value in timm_sd.items():
        for pattern, target in _BACKBONE_RULES:
            if re.fullmatch(pattern, key):
                new = re.sub(f'^{pattern}$', target.format(**names), key)
                out[new] = value
                report.mapped.append((key, 'backbone.' + new))
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointConversionError(f'unexpected backbone keys (not DINOv2): {unexpected[:20]}'
                                        + (' ...' if len(unexpected) > 20 else ''))
    return out


def _check_against_model(ours: StateDict, arch: dict, num_heads: int,
                         grid: Tuple[int, int]) -> None:
    """Build DINOv2 on the meta device and require identical keys and shapes."""
    from eomt_mm.models.backbones.dinov2 import DINOv2
    with torch.device('meta'):
        model = DINOv2(
            arch=dict(embed_dims=arch['embed_dims'], num_layers=arch['num_layers'],
                      num_heads=num_heads, feedforward_channels=arch['feedforward_channels'],
                      ffn_type=arch['ffn_type']),
            img_size=(grid[0] * arch['patch_size'], grid[1] * arch['patch_size']),
            patch_size=arch['patch_size'], in_channels=arch['in_channels'],
            num_register_tokens=arch['num_register_tokens'])
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    shapes = [f'{k}: {tuple(ours[k].shape)} vs {expected[k]}'
              for k in sorted(set(ours) & set(expected)) if tuple(ours[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        raise CheckpointConversionError(
            'converted backbone does not fit DINOv2'
            + (f'; missing: {missing[:20]}' if missing else '')
            + (f'; unexpected: {unexpected[:20]}' if unexpected else '')
            + (f'; bad shapes: {shapes[:20]}' if shapes else ''))


def _check_arch_name(arch: dict, arch_name: str) -> int:
    from eomt_mm.models.backbones.dinov2 import DINOv2
    key = arch_name.lower()
    if key not in DINOv2.arch_zoo:
        raise CheckpointConversionError(f'unknown --arch {arch_name!r}; expected one of '
                                        f'{sorted(DINOv2.arch_zoo)}')
    want = DINOv2.arch_zoo[key]
    got = dict(embed_dims=arch['embed_dims'], num_layers=arch['num_layers'],
               feedforward_channels=arch['feedforward_channels'], ffn_type=arch['ffn_type'])
    want_cmp = dict(embed_dims=want['embed_dims'], num_layers=want['num_layers'],
                    feedforward_channels=want['feedforward_channels'],
                    ffn_type=want.get('ffn_type', 'origin'))
    if got != want_cmp:
        raise CheckpointConversionError(f'checkpoint is not DINOv2-{arch_name}: it has {got}, '
                                        f'DINOv2-{arch_name} has {want_cmp}')
    return want['num_heads']


def _map_decoder(canonical: StateDict, report: ConversionReport) -> StateDict:
    out, unexpected = {}, []
    for key, value in canonical.items():
        for pattern, target in DECODER_KEY_MAP:
            if re.fullmatch(pattern, key):
                new = re.sub(f'^{pattern}$', target, key)
                out[new] = value
                report.mapped.append((key, new))
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointConversionError(f'unexpected EoMT decoder keys: {unexpected[:20]}')
    return out


def _check_decoder_against_model(decoder_sd: StateDict, info: dict, embed_dims: int,
                                 patch_size: int) -> None:
    """Build EoMTDecoder on the meta device and require the mapped keys and shapes to match."""
    from eomt_mm.models.decode_heads.eomt_decoder import EoMTDecoder
    with torch.device('meta'):
        decoder = EoMTDecoder(num_classes=info['num_classes'], embed_dims=embed_dims,
                              patch_size=patch_size, num_queries=info['num_queries'],
                              num_blocks=info['num_blocks'])
    expected = {'decoder.' + k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    missing = sorted(set(expected) - set(decoder_sd))
    unexpected = sorted(set(decoder_sd) - set(expected))
    shapes = [f'{k}: {tuple(decoder_sd[k].shape)} vs {expected[k]}'
              for k in sorted(set(expected) & set(decoder_sd))
              if tuple(decoder_sd[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        raise CheckpointConversionError(
            'converted decoder does not fit EoMTDecoder (fix DECODER_KEY_MAP)'
            + (f'; missing: {missing}' if missing else '')
            + (f'; unexpected: {unexpected}' if unexpected else '')
            + (f'; bad shapes: {shapes}' if shapes else ''))


def _decoder_meta(canonical: StateDict, embed_dims: int, patch_size: int) -> dict:
    """Validate the decoder tensors' shapes and describe them (num queries, classes, blocks)."""
    needed = ['q.weight', 'class_head.weight', 'class_head.bias', 'attn_mask_probs']
    needed += [f'mask_head.{i}.{p}' for i in (0, 2, 4) for p in ('weight', 'bias')]
    missing = [k for k in needed if k not in canonical]
    upscale_ids = sorted({int(m.group(1)) for k in canonical
                          if (m := re.match(r'upscale\.(\d+)\.', k))})
    num_upscale = max(1, int(math.log2(patch_size)) - 2)
    if upscale_ids != list(range(num_upscale)):
        missing.append(f'upscale blocks 0..{num_upscale - 1} for patch {patch_size} '
                       f'(found {upscale_ids})')
    for i in range(num_upscale):
        missing += [k for k in (f'upscale.{i}.conv1.weight', f'upscale.{i}.conv1.bias',
                                f'upscale.{i}.conv2.weight', f'upscale.{i}.norm.weight',
                                f'upscale.{i}.norm.bias') if k not in canonical]
    if missing:
        raise CheckpointConversionError(f'EoMT decoder incomplete; missing: {missing}')
    d = embed_dims
    q = canonical['q.weight']
    num_classes = canonical['class_head.weight'].shape[0] - 1
    expected = {'q.weight': (q.shape[0], d), 'class_head.weight': (num_classes + 1, d),
                'class_head.bias': (num_classes + 1,),
                'attn_mask_probs': (canonical['attn_mask_probs'].numel(),)}
    for i in (0, 2, 4):
        expected[f'mask_head.{i}.weight'] = (d, d)
        expected[f'mask_head.{i}.bias'] = (d,)
    for i in range(num_upscale):
        expected.update({f'upscale.{i}.conv1.weight': (d, d, 2, 2),
                         f'upscale.{i}.conv1.bias': (d,),
                         f'upscale.{i}.conv2.weight': (d, 1, 3, 3),
                         f'upscale.{i}.norm.weight': (d,), f'upscale.{i}.norm.bias': (d,)})
    bad = [f'{k}: {tuple(canonical[k].shape)} vs {v}' for k, v in expected.items()
           if tuple(canonical[k].shape) != v]
    if bad:
        raise CheckpointConversionError(f'EoMT decoder shapes do not fit embed_dims {d}: {bad}')
    return dict(num_queries=int(q.shape[0]), num_classes=int(num_classes),
                num_blocks=int(canonical['attn_mask_probs'].numel()), num_upscale=num_upscale)


# ------------------------------------------------------------------------------- entry points
def convert_state_dict(src: StateDict,
                       fmt: str,
                       patch_size: Optional[int] = None,
                       img_size: Optional[int | Tuple[int, int]] = None,
                       arch: Optional[str] = None) -> Tuple[StateDict, dict, ConversionReport]:
    """Convert a source state dict into this project's format.

    Args:
        src: Source state dict (already unwrapped, see :func:`load_source_state_dict`).
        fmt: One of :data:`FORMATS`.
        patch_size: Resample the patch kernel to this size (FlexiViT pseudo-inverse), e.g. 16 for
            EoMT from a 14-pixel DINOv2. None keeps the source's.
        img_size: Resize the position embedding to the grid ``img_size // patch_size`` (bicubic,
            anti-aliased like timm). None keeps the source grid (the model still resizes it at
            load time / per input).
        arch: Optional DINOv2 arch name (``'s'``, ``'b'``, ``'l'``, ``'g'``...) the checkpoint must
            be; also records the head count in the metadata.

    Returns:
        ``(state_dict, meta, report)``.

    Raises:
        CheckpointConversionError: unknown format, unexpected or missing keys, bad shapes, or an
            architecture different from ``arch``.
    """
    if fmt not in FORMATS:
        raise CheckpointConversionError(f'unknown format {fmt!r}; expected one of {FORMATS}')
    report = ConversionReport()
    decoder_canonical: Optional[StateDict] = None
    if fmt == 'meta-dinov2':
        timm_sd = _from_meta(src, report)
    elif fmt == 'timm':
        timm_sd = _from_timm(src, report)
    elif fmt == 'eomt':
        timm_sd, decoder_canonical = _split_eomt(src, report)
    else:
        timm_sd, decoder_canonical = _split_hf(src, report)

    reg = timm_sd.get('reg_token')
    if reg is not None and reg.shape[1] == 0:  # HF EoMT keeps a [1, 0, C] tensor for "none"
        del timm_sd['reg_token']
        report.skipped.append(('reg_token', 'empty (no register tokens)'))
    info = infer_backbone_arch(timm_sd)
    num_heads = _check_arch_name(info, arch) if arch else None
    src_patch = info['patch_size']
    new_patch = patch_size or src_patch
    if decoder_canonical is not None and new_patch != src_patch:
        raise CheckpointConversionError(
            f'cannot change the patch size of a full EoMT checkpoint ({src_patch} -> {new_patch}): '
            'its upscaler and heads were trained for the original patch size')
    if new_patch != src_patch:
        timm_sd['patch_embed.proj.weight'] = resample_patch_kernel(
            timm_sd['patch_embed.proj.weight'], (new_patch, new_patch))
        report.notes.append(f'resampled the patch kernel {src_patch}x{src_patch} -> '
                            f'{new_patch}x{new_patch} (FlexiViT pseudo-inverse, bicubic, '
                            'antialias)')

    pos = timm_sd['pos_embed']
    side = math.isqrt(pos.shape[1])
    if pos.ndim != 3 or side * side != pos.shape[1]:
        raise CheckpointConversionError(f'pos_embed must be a square patch-only grid [1, h*w, C], '
                                        f'got {tuple(pos.shape)} (a CLS-inclusive table means the '
                                        "source is in Meta's layout: use --format meta-dinov2)")
    grid = (side, side)
    if img_size is not None:
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if any(s % new_patch for s in img_hw):
            raise CheckpointConversionError(f'img_size {img_hw} is not a multiple of the patch '
                                            f'size {new_patch}')
        new_grid = (img_hw[0] // new_patch, img_hw[1] // new_patch)
        if new_grid != grid:
            timm_sd['pos_embed'] = resize_pos_embed_grid(pos, grid, new_grid)
            report.notes.append(f'resized pos_embed {grid[0]}x{grid[1]} -> '
                                f'{new_grid[0]}x{new_grid[1]} (bicubic, antialias)')
            grid = new_grid

    ours = _rename_backbone(timm_sd, info['ffn_type'], report)
    arch_info = dict(info, patch_size=new_patch)
    _check_against_model(ours, arch_info, num_heads or 1, grid)
    state_dict = {'backbone.' + k: v for k, v in ours.items()}
    meta = dict(format_version=FORMAT_VERSION, source_format=fmt,
                backbone=dict(arch=arch, num_heads=num_heads,
                              embed_dims=info['embed_dims'], num_layers=info['num_layers'],
                              feedforward_channels=info['feedforward_channels'],
                              ffn_type=info['ffn_type'], patch_size=new_patch,
                              source_patch_size=src_patch,
                              num_register_tokens=info['num_register_tokens'],
                              pos_embed_grid=list(grid),
                              img_size=[grid[0] * new_patch, grid[1] * new_patch]))
    if decoder_canonical is not None:
        meta['decoder'] = _decoder_meta(decoder_canonical, info['embed_dims'], new_patch)
        decoder_sd = _map_decoder(decoder_canonical, report)
        _check_decoder_against_model(decoder_sd, meta['decoder'], info['embed_dims'], new_patch)
        state_dict.update(decoder_sd)
        probs = decoder_canonical['attn_mask_probs']
        if bool((probs > 0).any()):
            report.notes.append(f'attn_mask_probs = {probs.tolist()}: masked attention was '
                                'still active when this checkpoint was saved (fine for resuming '
                                'training)')
    return state_dict, meta, report


def save_converted(path: str, state_dict: StateDict, meta: dict) -> None:
    """Write ``{'state_dict', 'meta'}`` atomically (temp file in the same folder + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.convert_', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save({'state_dict': {k: v.contiguous() for k, v in state_dict.items()},
                        'meta': meta}, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert_file(src_path: str,
                 dst_path: str,
                 fmt: str,
                 patch_size: Optional[int] = None,
                 img_size: Optional[int] = None,
                 arch: Optional[str] = None,
                 log: Callable[[str], None] = print) -> Tuple[dict, ConversionReport]:
    """Load ``src_path``, convert it (see :func:`convert_state_dict`) and save to ``dst_path``."""
    src = load_source_state_dict(src_path)
    state_dict, meta, report = convert_state_dict(src, fmt, patch_size=patch_size,
                                                  img_size=img_size, arch=arch)
    meta['source'] = os.path.basename(src_path)
    save_converted(dst_path, state_dict, meta)
    log(report.format())
    log(f'wrote {len(state_dict)} tensors to {dst_path} ({meta["backbone"]})')
    return meta, report
