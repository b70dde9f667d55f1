"""tools/convert_weights.py on DINOv3: Meta's hub layout, transformers' DINOv3ViTModel and
EomtDinov3ForUniversalSegmentation, and the reference's delta checkpoints.

Every source is built here from tiny random transformers models (saved with
``save_pretrained``) or laid out from their tensors in the other layouts, then converted and
compared: outputs against transformers, tensors across layouts, ``base + delta`` against the
full model. An adapter trained on one converted DINOv3 EoMT loads onto another.
"""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

from eomt_mm.converters import CheckpointConversionError, convert_state_dict
from eomt_mm.lora import LoRALinear, load_adapter, save_adapter
from eomt_mm.models.backbones import DINOv3

transformers = pytest.importorskip('transformers')

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('convert_weights',
                                               ROOT / 'tools' / 'convert_weights.py')
convert_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_weights)

DIMS, HEADS, LAYERS, REGS, SIZE = 64, 2, 3, 4, 64
# SwiGLU: transformers' intermediate_size 128 = mmpretrain's hidden for feedforward_channels 192.
PLAIN = dict(embed_dims=DIMS, num_layers=LAYERS, num_heads=HEADS, feedforward_channels=128)
GATED = dict(PLAIN, feedforward_channels=192, ffn_type='swiglu_fused')
LORA_CONFIG = ROOT / 'configs' / 'eomt' / 'eomt-lora-r8_dinov3-b_1xb16-20k_cityscapes-640x640.py'


# ------------------------------------------------------------------------------ sources
def _randomize(model, seed):
    """Random values everywhere, also where transformers initialises constants."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.25 * noise if 'lambda1' in name or re.search(
                r'norm\w*\.weight|layernorm2d\.weight', name) else 0.2 * noise)
    return model.eval()


def _hf_dinov3(gated=False, seed=0, layers=LAYERS):
    config = transformers.DINOv3ViTConfig(
        hidden_size=DIMS, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_register_tokens=REGS, layer_norm_eps=1e-5,
        image_size=SIZE, patch_size=16, use_gated_mlp=gated,
        hidden_act='silu' if gated else 'gelu')  # the hub's S+ / H+ configs: SwiGLU = silu
    return _randomize(transformers.DINOv3ViTModel(config), seed)


def _hf_eomt_dinov3(seed=0, probs=0.0):
    config = transformers.EomtDinov3Config(
        hidden_size=DIMS, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_register_tokens=REGS, layer_norm_eps=1e-5,
        image_size=SIZE, patch_size=16, num_blocks=2, num_queries=5, num_labels=3,
        num_upscale_blocks=2)
    model = _randomize(transformers.EomtDinov3ForUniversalSegmentation(config), seed)
    model.attn_mask_probs.fill_(probs)
    return model


def _hf_names(state_dict):
    """transformers 5 keeps DINOv3ViTModel's blocks under ``model.layer``; use ``layer``."""
    return {re.sub(r'^model\.layer\.', 'layer.', k): v for k, v in state_dict.items()}


def _meta_layout(hf_model):
    """The same DINOv3 weights in Meta's hub layout (masked qkv bias with junk key values)."""
    hf = _hf_names(hf_model.state_dict())
    gen = torch.Generator().manual_seed(99)
    head_dims = DIMS // HEADS
    periods = 100.0**(torch.arange(head_dims // 4) / (head_dims // 4))
    meta = {'cls_token': hf['embeddings.cls_token'],
            'storage_tokens': hf['embeddings.register_tokens'],
            'mask_token': torch.zeros(1, DIMS),
            'patch_embed.proj.weight': hf['embeddings.patch_embeddings.weight'],
            'patch_embed.proj.bias': hf['embeddings.patch_embeddings.bias'],
            'rope_embed.periods': periods.to(torch.bfloat16),  # as Meta's files store them
            'norm.weight': hf['norm.weight'], 'norm.bias': hf['norm.bias']}
    for i in range(hf_model.config.num_hidden_layers):
        src, dst = f'layer.{i}.', f'blocks.{i}.'
        attn = src + 'attention.'
        meta[dst + 'attn.qkv.weight'] = torch.cat(
            [hf[attn + f'{p}_proj.weight'] for p in 'qkv'])
        meta[dst + 'attn.qkv.bias'] = torch.cat(
            [hf[attn + 'q_proj.bias'], torch.randn(DIMS, generator=gen), hf[attn + 'v_proj.bias']])
        meta[dst + 'attn.qkv.bias_mask'] = torch.cat(
            [torch.ones(DIMS), torch.zeros(DIMS), torch.ones(DIMS)])
        for name in ('norm1', 'norm2'):
            for p in ('weight', 'bias'):
                meta[dst + f'{name}.{p}'] = hf[src + f'{name}.{p}']
        for p in ('weight', 'bias'):
            meta[dst + f'attn.proj.{p}'] = hf[attn + f'o_proj.{p}']
        meta[dst + 'ls1.gamma'] = hf[src + 'layer_scale1.lambda1']
        meta[dst + 'ls2.gamma'] = hf[src + 'layer_scale2.lambda1']
        names = ({'w1': 'gate_proj', 'w2': 'up_proj', 'w3': 'down_proj'}
                 if hf_model.config.use_gated_mlp else {'fc1': 'up_proj', 'fc2': 'down_proj'})
        for ours, theirs in names.items():
            for p in ('weight', 'bias'):
                meta[dst + f'mlp.{ours}.{p}'] = hf[src + f'mlp.{theirs}.{p}']
    return meta


def _save_pretrained(model, folder):
    model.save_pretrained(str(folder))
    path = folder / 'model.safetensors'
    assert path.is_file()
    return path


def _run_cli(*args):
    """The converter as a user runs it: a subprocess with this interpreter (slow: used once)."""
    return subprocess.run([sys.executable, str(ROOT / 'tools' / 'convert_weights.py'),
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def _main(*args):
    """The converter's CLI entry point in this process: exit status."""
    return convert_weights.main([str(a) for a in args])


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _our_backbone(state_dict, arch):
    model = DINOv3(arch=arch, patch_size=16, num_register_tokens=REGS).eval()
    model.load_state_dict({k[len('backbone.'):]: v for k, v in state_dict.items()
                           if k.startswith('backbone.')}, strict=True)
    return model


def _tokens(model, images):
    x, _ = model.embed(images)
    for i in range(model.num_layers):
        x = model.forward_block(i, x)
    return model.final_norm(x)


def _our_eomt(state_dict, arch):
    init_default_scope('mmseg')
    model = MODELS.build(dict(
        type='EoMT', backbone=dict(type='DINOv3', arch=arch, num_register_tokens=REGS),
        decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=5, num_blocks=2),
        test_cfg=dict(mode='whole'))).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


# --------------------------------------------------------------------- backbone formats
@pytest.mark.parametrize('arch', [PLAIN, GATED], ids=['mlp', 'swiglu'])
def test_hf_dinov3_converts_to_the_same_function(tmp_path, capsys, arch):
    gated = 'ffn_type' in arch
    hf = _hf_dinov3(gated=gated)
    src = _save_pretrained(hf, tmp_path / 'hf')
    dst = tmp_path / 'out' / 'dinov3.pth'
    assert _main(src, dst, '--format', 'hf-dinov3') == 0
    ckpt = _load(dst)
    assert ckpt['meta']['backbone']['ffn_type'] == ('swiglu_fused' if gated else 'origin')
    assert 'embeddings.mask_token: DINOv3 pre-training only' in capsys.readouterr().out
    ours = _our_backbone(ckpt['state_dict'], arch)
    images = torch.randn(2, 3, 48, 80)  # non-square: RoPE normalises each axis on its own
    with torch.no_grad():
        expected = hf(pixel_values=images).last_hidden_state
        torch.testing.assert_close(_tokens(ours, images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
def test_meta_and_hf_layouts_give_identical_tensors(gated):
    hf = _hf_dinov3(gated=gated, seed=4)
    from_hf, meta_hf, _ = convert_state_dict(dict(hf.state_dict()), 'hf-dinov3')
    from_meta, meta_meta, report = convert_state_dict(_meta_layout(hf), 'meta-dinov3')
    assert from_meta.keys() == from_hf.keys()
    for key, value in from_hf.items():
        torch.testing.assert_close(from_meta[key], value, atol=0, rtol=0, msg=key)
    # The masked key bias (junk values in the Meta file) is written as zeros.
    assert not from_meta['backbone.layers.0.attn.qkv.bias'][DIMS:2 * DIMS].any()
    # Meta's RoPE periods give the head count; transformers' file has none.
    assert (meta_meta['backbone']['num_heads'], meta_hf['backbone']['num_heads']) == (HEADS, None)
    assert {k for k, _ in report.skipped} == {'mask_token', 'rope_embed.periods'}


def test_meta_file_through_the_cli_with_arch_check(tmp_path, capsys):
    src = tmp_path / 'dinov3_tiny.pth'
    torch.save(_meta_layout(_hf_dinov3()), src)
    assert _main(src, tmp_path / 'wrong.pth', '--format', 'meta-dinov3', '--arch', 'b') == 1
    assert 'is not DINOv3-b' in capsys.readouterr().err
    assert not (tmp_path / 'wrong.pth').exists()
    assert _main(src, tmp_path / 'ok.pth', '--format', 'meta-dinov3') == 0
    assert _load(tmp_path / 'ok.pth')['meta']['backbone']['num_heads'] == HEADS


def _refusal(src, fmt, match, **kwargs):
    with pytest.raises(CheckpointConversionError, match=match):
        convert_state_dict(src, fmt, **kwargs)


def test_backbone_formats_refuse_misfits():
    hf_sd = dict(_hf_dinov3().state_dict())
    meta = _meta_layout(_hf_dinov3())
    _refusal(meta, 'hf-dinov3', 'not a transformers DINOv3ViTModel')
    _refusal(hf_sd, 'meta-dinov3', 'not a Meta DINOv3')
    dinov2_meta = dict(meta, pos_embed=torch.zeros(1, 17, DIMS))
    _refusal(dinov2_meta, 'meta-dinov3', 'meta-dinov2')
    _refusal(dict(hf_sd, **{'embeddings.position_embeddings.weight': torch.zeros(17, DIMS)}),
             'hf-dinov3', 'DINOv2')
    _refusal(dict(meta, **{'rope_embed.periods': torch.linspace(1, 50, 8)}), 'meta-dinov3',
             'not the base-100 periods')
    _refusal(dict(meta, extra_head=torch.zeros(3)), 'meta-dinov3', 'extra_head')
    _refusal(meta, 'meta-dinov3', 'drop --patch-size', patch_size=14)
    _refusal(meta, 'meta-dinov3', 'drop --img-size', img_size=512)
    _refusal(meta, 'meta-dinov3', 'unknown --arch', arch='xl')
    no_block = {k: v for k, v in meta.items() if not k.startswith('blocks.1.')}
    _refusal(no_block, 'meta-dinov3', 'not contiguous')


# ---------------------------------------------------------------------- EoMT formats
def test_hf_eomt_dinov3_converts_to_the_same_model(tmp_path):
    # GELU MLP only: transformers' EoMT-DINOv3 applies config.hidden_act in the gated MLP AND
    # in its heads, while the reference (and this project) use SiLU in SwiGLU and GELU in the
    # heads; the gated layout's conversion is covered by the backbone tests above.
    hf = _hf_eomt_dinov3(seed=1)
    src = _save_pretrained(hf, tmp_path / 'hf_eomt')
    dst = tmp_path / 'eomt.pth'
    assert _main(src, dst, '--format', 'hf-eomt-dinov3') == 0
    ckpt = _load(dst)
    assert ckpt['meta']['decoder'] == dict(num_queries=5, num_classes=3, num_blocks=2,
                                           num_upscale=2)
    ours = _our_eomt(ckpt['state_dict'], PLAIN)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = hf(pixel_values=images)
        masks, classes = ours(images, mode='tensor')
        torch.testing.assert_close(classes[-1], out.class_queries_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(masks[-1], out.masks_queries_logits, atol=1e-4, rtol=1e-4)
        # Masked attention: transformers applies it at inference while attn_mask_probs > 0
        # (with probability 1 no query is exempted, so both are deterministic).
        hf.attn_mask_probs.fill_(1.0)
        ours.decoder.attn_mask_probs.fill_(1.0)
        out = hf(pixel_values=images)
        masks, classes = ours.run_network(images, masked_attn=True)
        torch.testing.assert_close(classes[-1], out.class_queries_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(masks[-1], out.masks_queries_logits, atol=1e-4, rtol=1e-4)


def _reference_delta(full, base):
    """A reference-style delta: ``full - base`` in the backbone, ``full`` elsewhere, buffers
    minus their initial values (ones for attn_mask_probs, ImageNet statistics unchanged)."""
    base_sd = _hf_names(base.state_dict())
    heads = {'query.weight': 'q.weight', 'class_predictor.': 'class_head.',
             'mask_head.fc1.': 'mask_head.0.', 'mask_head.fc2.': 'mask_head.2.',
             'mask_head.fc3.': 'mask_head.4.', 'upscale_block.block.': 'upscale.',
             'layernorm2d.': 'norm.'}
    delta = {'network.encoder.pixel_mean': torch.zeros(1, 3, 1, 1),
             'network.encoder.pixel_std': torch.zeros(1, 3, 1, 1),
             'criterion.empty_weight': torch.ones(4)}
    for key, value in full.state_dict().items():
        if key.startswith('criterion.'):
            continue
        if key.startswith(('embeddings.', 'layers.', 'layernorm.')):
            base_key = re.sub(r'^layers\.', 'layer.', key).replace('layernorm.', 'norm.')
            name = re.sub(r'^embeddings\.', 'patch_embed.', re.sub(r'^layers\.', 'blocks.', key))
            name = name.replace('layernorm.', 'norm.')
            delta['network.encoder.backbone.' + name] = value - base_sd[base_key]
        elif key == 'attn_mask_probs':
            delta['network.attn_mask_probs'] = value - 1.0
        else:
            for theirs, ref in heads.items():
                key = key.replace(theirs, ref)
            delta['network.' + key] = value
    return delta


def test_reference_delta_plus_base_equals_the_full_model(tmp_path):
    full = _hf_eomt_dinov3(seed=2)
    base = _hf_dinov3(seed=3)
    delta = _reference_delta(full, base)
    expected, _, _ = convert_state_dict(dict(full.state_dict()), 'hf-eomt-dinov3')
    delta_path = tmp_path / 'pytorch_model.bin'
    torch.save(delta, delta_path)
    hf_base = _save_pretrained(base, tmp_path / 'base_hf')
    meta_base = tmp_path / 'dinov3_meta.pth'
    torch.save(_meta_layout(base), meta_base)
    for base_path in (hf_base, meta_base):  # transformers' or Meta's layout of the same base
        dst = tmp_path / f'eomt_from_{base_path.stem}.pth'
        if base_path is hf_base:  # once as a user runs it
            proc = _run_cli(delta_path, dst, '--format', 'eomt-dinov3', '--base', base_path)
            assert proc.returncode == 0, proc.stderr
            assert 'backbone = --base + delta' in proc.stdout
        else:
            assert _main(delta_path, dst, '--format', 'eomt-dinov3', '--base', base_path) == 0
        converted = _load(dst)['state_dict']
        assert converted.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(converted[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert not converted['decoder.attn_mask_probs'].any()  # 1 + (0 - 1)


def test_delta_format_refuses_misfits(tmp_path, capsys):
    full, base = _hf_eomt_dinov3(seed=2), _hf_dinov3(seed=3)
    delta = _reference_delta(full, base)
    _refusal(delta, 'eomt-dinov3', 'pass those with --base')
    shallow = dict(_hf_dinov3(seed=3, layers=2).state_dict())
    _refusal(delta, 'eomt-dinov3', 'trained on 3 layers', base=shallow)
    dinov2 = {'cls_token': torch.zeros(1, 1, DIMS), 'pos_embed': torch.zeros(1, 16, DIMS),
              'reg_token': torch.zeros(1, 4, DIMS)}
    _refusal(delta, 'eomt-dinov3', 'DINOv2', base=dinov2)
    _refusal(dict(delta, **{'network.attn_mask_probs': torch.ones(2)}), 'eomt-dinov3',
             'outside \\[0, 1\\]', base=dict(base.state_dict()))
    _refusal(dict(delta, **{'network.encoder.pixel_mean': torch.ones(1, 3, 1, 1)}),
             'eomt-dinov3', 'differs from ImageNet', base=dict(base.state_dict()))
    _refusal(dict(full.state_dict()), 'eomt-dinov3', 'not a reference EoMT-DINOv3')
    _refusal(delta, 'hf-eomt-dinov3', 'not a transformers EoMT-DINOv3')
    # --base belongs to the delta format only; the CLI writes nothing on refusal.
    base_path = _save_pretrained(base, tmp_path / 'base')
    src = tmp_path / 'meta.pth'
    torch.save(_meta_layout(base), src)
    assert _main(src, tmp_path / 'x.pth', '--format', 'meta-dinov3', '--base', base_path) == 1
    assert 'drop --base' in capsys.readouterr().err
    assert not (tmp_path / 'x.pth').exists()


# ---------------------------------------------------------------------------- adapters
def test_adapter_moves_between_dinov3_eomts_built_from_one_config(tmp_path):
    src = tmp_path / 'meta.pth'
    torch.save(_meta_layout(_hf_dinov3(seed=5)), src)
    pretrained = tmp_path / 'dinov3_tiny.pth'
    assert _main(src, pretrained, '--format', 'meta-dinov3') == 0
    cfg = Config.fromfile(str(LORA_CONFIG))
    cfg.model.backbone.arch = PLAIN
    cfg.model.backbone.init_cfg.checkpoint = str(pretrained)
    cfg.model.decoder.update(num_queries=5, num_blocks=2)
    init_default_scope('mmseg')

    def build(seed):
        torch.manual_seed(seed)
        model = MODELS.build(cfg.model)
        model.init_weights()
        return model.eval()

    trained = build(0)
    assert {type(m) for m in trained.modules()} >= {LoRALinear}
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # "training": every trainable tensor moves
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_adapter(trained, str(tmp_path / 'adapter'))
    other = build(1)
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want = trained(images, mode='tensor')
        before = other(images, mode='tensor')
        assert not torch.allclose(before[1][-1], want[1][-1])
        load_adapter(other, str(tmp_path / 'adapter'))
        got = other(images, mode='tensor')
    torch.testing.assert_close(got[0][-1], want[0][-1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1][-1], want[1][-1], atol=1e-6, rtol=1e-6)
