"""EoMT on the DINOv3 backbone against transformers' EomtDinov3ForUniversalSegmentation
(inference, masked attention in eval and seeded train mode, with and without the RoPE rescale),
activation checkpointing with RoPE augmentation, and LoRA + freezing on the whole model."""
import pytest
import torch
from mmseg.registry import MODELS
from test_backbone_dinov3 import hf_to_ours

EMBED, DEPTH, HEADS, REG, HIDDEN, L2, QUERIES, CLASSES, SIZE = 32, 4, 2, 4, 64, 2, 6, 3, 64
TARGETS = ['qkv', 'proj', 'fc1', 'fc2']


def _randomize(module: torch.nn.Module) -> None:
    """Random weights of a healthy scale; a DINOv3 key bias stays zero."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if 'lambda1' in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            if name.endswith('attn.qkv.bias'):
                p[EMBED:2 * EMBED] = 0


def _hf_model(gated: bool = False, **aug):
    transformers = pytest.importorskip('transformers')
    config = transformers.EomtDinov3Config(
        hidden_size=EMBED, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=HIDDEN, image_size=SIZE, patch_size=16, num_register_tokens=REG,
        num_blocks=L2, num_queries=QUERIES, num_labels=CLASSES, num_upscale_blocks=2,
        layer_norm_eps=1e-5, use_gated_mlp=gated, hidden_act='silu' if gated else 'gelu', **aug)
    model = transformers.EomtDinov3ForUniversalSegmentation(config)
    if gated:
        # transformers' EoMT runs its mask head and upscaler with config.hidden_act, which a
        # SwiGLU backbone sets to 'silu'; the EoMT reference (tue-mps/eomt) and this project use
        # GELU there whatever the backbone, so the comparison gives transformers' heads GELU.
        model.mask_head.activation = torch.nn.GELU()
        for block in model.upscale_block.block:
            block.activation = torch.nn.GELU()
    _randomize(model)
    return model.eval()


def _hf_decoder_to_ours(sd: dict) -> dict:
    """Decoder keys of transformers' EoMT -> this project's EoMTDecoder (test-local)."""
    out = {'decoder.q.weight': sd['query.weight'],
           'decoder.attn_mask_probs': sd['attn_mask_probs']}
    for key, value in sd.items():
        for theirs, ours in [('class_predictor.', 'decoder.class_head.'),
                             ('mask_head.fc1.', 'decoder.mask_head.0.'),
                             ('mask_head.fc2.', 'decoder.mask_head.2.'),
                             ('mask_head.fc3.', 'decoder.mask_head.4.')]:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
        if key.startswith('upscale_block.block.'):
            index, rest = key[len('upscale_block.block.'):].split('.', 1)
            out[f'decoder.upscale.{index}.' + rest.replace('layernorm2d', 'norm')] = value
    return out


def _ours(gated: bool = False, checkpoint_blocks: int = 0, lora_config: dict = None, **aug):
    arch = dict(embed_dims=EMBED, num_layers=DEPTH, num_heads=HEADS,
                feedforward_channels=96 if gated else HIDDEN,
                ffn_type='swiglu_fused' if gated else 'origin')
    return MODELS.build(dict(
        type='EoMT',
        backbone=dict(type='DINOv3', arch=arch, num_register_tokens=REG, **aug),
        decoder=dict(type='EoMTDecoder', num_classes=CLASSES, num_queries=QUERIES,
                     num_blocks=L2, num_points=64),
        checkpoint_blocks=checkpoint_blocks, lora_config=lora_config))


def _pair(gated: bool = False, ours_aug: dict = None, hf_aug: dict = None, **kwargs):
    hf = _hf_model(gated, **(hf_aug or {}))
    ours = _ours(gated, **(ours_aug or {}), **kwargs)
    sd = hf.state_dict()
    converted = {'backbone.' + k: v for k, v in hf_to_ours(
        sd, DEPTH, gated, layer_prefix='layers.', final_norm='layernorm').items()}
    converted.update(_hf_decoder_to_ours(sd))
    missing, unexpected = ours.load_state_dict(converted, strict=False)
    assert not unexpected
    assert all(k.startswith('decoder.loss_module.') for k in missing), missing
    return hf, ours.eval()


def _assert_same(ours_masks, ours_classes, hf_out):
    torch.testing.assert_close(ours_classes, hf_out.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_masks, hf_out.masks_queries_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ equality with transformers
@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
def test_inference_equals_transformers(gated):
    hf, ours = _pair(gated)
    hf.attn_mask_probs.zero_()  # transformers masks at inference while p > 0; ours never does
    ours.decoder.attn_mask_probs.fill_(1.0)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = hf(pixel_values=x)
        masks, classes = ours.forward_logits(x)
    assert masks.shape == (2, QUERIES, SIZE // 4, SIZE // 4)
    _assert_same(masks, classes, expected)


@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
def test_masked_attention_equals_transformers_in_eval_mode(gated):
    hf, ours = _pair(gated)
    hf.attn_mask_probs.fill_(1.0)
    ours.decoder.attn_mask_probs.fill_(1.0)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = hf(pixel_values=x)
        masks, classes = ours.run_network(x, masked_attn=True)
        plain, _ = ours.forward_logits(x)
    assert len(masks) == L2 + 1
    _assert_same(masks[-1], classes[-1], expected)
    assert (plain - masks[-1]).abs().max() > 1e-3  # the masks were not a no-op


@pytest.mark.parametrize('rescale', [None, 2.0], ids=['rope-aug-off', 'rope-rescale'])
def test_masked_attention_equals_transformers_in_seeded_train_mode(rescale):
    """Same random draws in the same order: the RoPE rescale at embedding, then one keep draw
    per query block with p < 1."""
    aug = dict(pos_embed_rescale=rescale)
    hf, ours = _pair(False, aug, aug)
    hf.train(), ours.train()
    probs = torch.tensor([1.0, 0.5])
    hf.attn_mask_probs.copy_(probs)
    ours.decoder.attn_mask_probs.copy_(probs)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.manual_seed(21)
        expected = hf(pixel_values=x)
        torch.manual_seed(21)
        masks, classes = ours.run_network(x, masked_attn=True)
    _assert_same(masks[-1], classes[-1], expected)


# ------------------------------------------------------------------ activation checkpointing
def test_checkpointed_blocks_give_the_same_gradients_with_rope_augmentation():
    """Recomputed blocks reuse the forward's (randomly rescaled) RoPE tables."""
    plain, ckpt = _ours(checkpoint_blocks=0), _ours(checkpoint_blocks=DEPTH)
    _randomize(plain)
    ckpt.load_state_dict(plain.state_dict())
    assert plain.backbone.pos_embed_rescale == 2.0
    x = torch.randn(2, 3, SIZE, SIZE)
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(4)
        masks, classes = model.run_network(x, masked_attn=True)
        (sum(m.square().mean() for m in masks) + sum(c.square().mean() for c in classes)
         ).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    key_rows = slice(EMBED, 2 * EMBED)
    assert not grads[0]['backbone.layers.0.attn.qkv.bias'][key_rows].any()


# ------------------------------------------------------------------ LoRA + freezing
@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
def test_lora_default_targets_and_freezing_on_eomt_dinov3(gated):
    lora = dict(rank=2, lora_alpha=4, target_modules=TARGETS, qkv_enable=[True, False, True])
    model = _ours(gated, lora_config=lora)
    ffn = ('ffn.w12', 'ffn.w3') if gated else ('ffn.layers.0.0', 'ffn.layers.1')
    adapted = [f'backbone.layers.{i}.{leaf}' for i in range(DEPTH)
               for leaf in ('attn.qkv', 'attn.proj') + ffn]
    norms = [f'backbone.{name}.{leaf}' for name in
             ['ln1'] + [f'layers.{i}.ln{n}' for i in range(DEPTH) for n in (1, 2)]
             for leaf in ('weight', 'bias')]
    decoder = [n for n, _ in model.named_parameters() if n.startswith('decoder.')]
    expected = {f'{m}.lora_{ab}' for m in adapted for ab in 'AB'} | set(norms) | set(decoder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert len(decoder) > 10
    # One training step: gradients exactly on the trainable set; the key slice is not adapted.
    model.train()
    x = torch.randn(1, 3, SIZE, SIZE)
    masks, classes = model.run_network(x, masked_attn=True)
    (masks[-1].square().mean() + classes[-1].square().mean()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    qkv = model.backbone.layers[DEPTH - 1].attn.qkv
    with torch.no_grad():
        qkv.lora_B.normal_()
        tokens = torch.randn(1, 5, EMBED)
        delta = qkv(tokens) - torch.nn.functional.linear(tokens, qkv.weight, qkv.bias)
    assert not delta[..., EMBED:2 * EMBED].any() and delta[..., :EMBED].abs().sum() > 0
