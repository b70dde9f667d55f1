"""EoMT ``checkpoint_blocks`` / ``checkpoint_decoder``: non-reentrant activation checkpointing
of leading backbone blocks and of the decoder's predictions.

Checkpointing must change memory only: loss, every trainable gradient (LoRA with dropout
included) and inference outputs equal the plain run's.
"""
import math

import pytest
import torch
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from eomt_mm.models.segmentors.eomt import EoMT

EMBED, DEPTH, HEADS, L2, QUERIES, CLASSES, SIZE = 32, 4, 2, 2, 8, 4, 32
LORA = dict(enabled=True, rank=4, lora_alpha=8, lora_dropout=0.1,
            target_modules=['qkv', 'proj', 'fc1', 'fc2'], freeze_base_model=True)


def build(checkpoint_blocks=0, lora_config=LORA, checkpoint_decoder=False):
    cfg = dict(
        type='EoMT',
        backbone=dict(
            type='DINOv2',
            arch=dict(embed_dims=EMBED, num_layers=DEPTH, num_heads=HEADS,
                      feedforward_channels=4 * EMBED),
            img_size=SIZE, patch_size=16, num_register_tokens=4),
        decoder=dict(type='EoMTDecoder', num_classes=CLASSES, num_queries=QUERIES,
                     num_blocks=L2, num_points=64),
        lora_config=lora_config,
        checkpoint_blocks=checkpoint_blocks,
        checkpoint_decoder=checkpoint_decoder)
    model = MODELS.build(cfg)
    # Same healthy-scale weights in every build (LoRA B included, so the adapters matter).
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'gamma' in name:
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def batch(n=2):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(n, 3, SIZE, SIZE, generator=g)
    samples = []
    for _ in range(n):
        cells = torch.randint(0, CLASSES, (SIZE // 8, SIZE // 8), generator=g)
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=cells.repeat_interleave(8, 0).repeat_interleave(8, 1)[None])
        s.set_metainfo(dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE)))
        samples.append(s)
    return imgs, samples


def loss_and_grads(model, seed=7):
    model.train()
    imgs, samples = batch()
    torch.manual_seed(seed)
    losses = model.loss(imgs, samples)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return total.detach(), grads


@pytest.mark.parametrize('blocks,decoder', [(DEPTH - L2, False), ('frozen', False),
                                            (DEPTH, False), (0, True), ('frozen', True)])
def test_checkpointing_keeps_loss_and_every_gradient(blocks, decoder):
    plain_loss, plain = loss_and_grads(build(0))
    ckpt_model = build(blocks, checkpoint_decoder=decoder)
    assert ckpt_model.checkpoint_blocks == (DEPTH - L2 if blocks == 'frozen' else blocks)
    ckpt_loss, ckpt = loss_and_grads(ckpt_model)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    assert plain.keys() == ckpt.keys()
    assert any('lora_A' in n for n in plain) and any('lora_B' in n for n in plain)
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_dropout_is_live_so_the_equality_is_not_trivial():
    """Different seeds give different LoRA gradients: the dropout masks really are redrawn
    in the recomputation, from the restored RNG state."""
    _, a = loss_and_grads(build(DEPTH), seed=7)
    _, b = loss_and_grads(build(DEPTH), seed=8)
    name = 'backbone.layers.0.attn.qkv.lora_A'
    assert not torch.allclose(a[name], b[name])


def test_checkpointing_saves_fewer_activations():
    """Bytes handed to autograd in training: checkpointed blocks keep only their input."""

    def saved_bytes(model):
        model.train()
        imgs, samples = batch()
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.run_network(imgs, masked_attn=True)
        return total[0]

    plain = saved_bytes(build(0))
    assert saved_bytes(build(DEPTH - L2)) < 0.8 * plain
    # The decoder's upscaler maps (full width, 1/4 resolution, once per prediction) go too.
    decoder_only = saved_bytes(build(0, checkpoint_decoder=True))
    assert decoder_only < 0.8 * plain
    assert saved_bytes(build(DEPTH - L2, checkpoint_decoder=True)) < 0.8 * decoder_only


def test_inference_is_identical_and_never_checkpointed(monkeypatch):
    imgs, _ = batch()
    plain, ckpt = build(0).eval(), build(DEPTH).eval()
    calls = []
    import eomt_mm.models.segmentors.eomt as eomt_module
    real = eomt_module.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get('use_reentrant'))
        return real(*args, **kwargs)

    monkeypatch.setattr(eomt_module, 'checkpoint', spy)
    out_plain = plain.forward_logits(imgs)
    out_ckpt = ckpt.forward_logits(imgs)
    assert calls == []
    for a, b in zip(out_plain, out_ckpt):
        assert torch.equal(a, b)
    # In training with autograd on, exactly the leading blocks go through non-reentrant
    # checkpointing.
    ckpt.train()
    torch.manual_seed(0)
    ckpt.run_network(imgs, masked_attn=True)
    assert calls == [False] * DEPTH
    calls.clear()
    with torch.no_grad():
        ckpt.run_network(imgs, masked_attn=True)
    assert calls == []
    # checkpoint_decoder: every prediction (L2 intermediate + the final one) is checkpointed.
    dec = build(0, checkpoint_decoder=True).train()
    dec.run_network(imgs, masked_attn=True)
    assert calls == [False] * (L2 + 1)
    calls.clear()
    dec.eval()
    out_dec = dec.forward_logits(imgs)
    assert calls == []
    for a, b in zip(out_plain, out_dec):
        assert torch.equal(a, b)


def test_frozen_leading_blocks_build_no_graph():
    """With the patch embedding and the leading blocks frozen and without LoRA, nothing there
    requires grad: autograd saves no tensor and the block outputs have no grad_fn, so
    checkpointing them would gain nothing."""
    model = build(0, lora_config=None)
    model.backbone.requires_grad_(False)
    model.train()
    imgs, _ = batch()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x, _ = model.backbone.embed(imgs)
        for i in range(DEPTH - L2):
            x = model.backbone.forward_block(i, x)
    assert saved == [] and not x.requires_grad and x.grad_fn is None
    # The queries are trainable: the graph starts where they join.
    mask_logits, _ = model.run_network(imgs, masked_attn=True)
    assert mask_logits[-1].requires_grad


@pytest.mark.parametrize('bad', [-1, DEPTH + 1, 'all', 1.5, True])
def test_bad_checkpoint_blocks_is_a_clear_error(bad):
    with pytest.raises(ValueError, match='checkpoint_blocks'):
        build(bad)


@pytest.mark.parametrize('bad', [1, 'yes', None])
def test_bad_checkpoint_decoder_is_a_clear_error(bad):
    with pytest.raises(ValueError, match='checkpoint_decoder must be True or False'):
        build(0, checkpoint_decoder=bad)


def test_option_is_documented():
    doc = EoMT.__doc__
    assert 'checkpoint_blocks' in doc and 'use_reentrant=False' in doc and "'frozen'" in doc
    assert 'checkpoint_decoder' in doc
