"""Freezing, parameter counts, the trainable-only optimizer constructor and 'WithLoRA'."""

import pytest
import torch
from torch import nn

from eomt_mm.lora import (LoRALinear, apply_lora, count_parameters, freeze_base_model,
                          inject_lora)

DEFAULT_CFG = dict(enabled=True, rank=4, lora_alpha=8, lora_dropout=0.1,
                target_modules=['qkv', 'proj', 'fc1', 'fc2'], freeze_base_model=True)


# ------------------------------------------------------------------ test-local model
class _Block(nn.Module):

    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, -1)
        x = x + self.attn.proj(nn.functional.scaled_dot_product_attention(q, k, v))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class _Backbone(nn.Module):
    """Pretrained part; has modules whose names contain 'head' / 'norm' substrings."""

    def __init__(self, d=16, depth=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, 4)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, d)  # a pretrained 'head': must be frozen
        self.norm_proj = nn.Linear(d, d)  # 'norm' in the name but a Linear: frozen

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm_proj(self.head(self.norm(x)))


class _Head(nn.Module):
    """Not from the checkpoint: queries, class/mask heads, an upscaler; all must train."""

    def __init__(self, d=16, num_q=3, num_classes=4):
        super().__init__()
        self.q = nn.Embedding(num_q, d)
        self.class_head = nn.Linear(d, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.upscale = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.GroupNorm(1, d))

    def forward(self, tokens):
        b, n, d = tokens.shape
        grid = self.upscale(tokens.transpose(1, 2).reshape(b, d, 4, 4))
        q = self.q.weight[None].expand(b, -1, -1) + tokens.mean(1, keepdim=True)
        masks = torch.einsum('bqc,bchw->bqhw', self.mask_head(q), grid)
        return self.class_head(q).sum() + masks.sum()


class ToySegmentor(nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone, self.decode_head = _Backbone(), _Head()

    def forward(self, img):
        return self.decode_head(self.backbone(img))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- freezing
def test_freeze_keeps_lora_norms_and_everything_outside_the_base():
    model = apply_lora(ToySegmentor(), DEFAULT_CFG)
    lora = {f'backbone.blocks.{i}.{m}.{p}' for i in range(2)
            for m in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2') for p in ('lora_A', 'lora_B')}
    norms = {f'backbone.blocks.{i}.norm{j}.{p}' for i in range(2) for j in (1, 2)
             for p in ('weight', 'bias')} | {'backbone.norm.weight', 'backbone.norm.bias'}
    head = {n for n, _ in model.named_parameters() if n.startswith('decode_head.')}
    assert 'decode_head.q.weight' in head and 'decode_head.upscale.0.weight' in head
    assert _trainable(model) == lora | norms | head
    # substring traps (a LoRA fork that matched by substring fell in): frozen although
    # named '...head' / 'norm...'
    for name in ('backbone.head.weight', 'backbone.norm_proj.weight', 'backbone.pos_embed',
                 'backbone.patch_embed.weight', 'backbone.blocks.0.attn.qkv.weight',
                 'backbone.blocks.1.mlp.fc2.bias'):
        assert not dict(model.named_parameters())[name].requires_grad, name


def test_frozen_parameters_get_no_gradient():
    model = apply_lora(ToySegmentor(), DEFAULT_CFG)
    model(torch.randn(2, 3, 16, 16)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f'{name} is trainable but got no gradient'
        else:
            assert p.grad is None, f'{name} is frozen but got a gradient'


def test_trainable_modules_exact_names_and_regex():
    model = ToySegmentor()
    inject_lora(model, ['qkv'], prefixes=['backbone'])
    frozen = freeze_base_model(model, ['backbone'],
                               trainable_modules=['backbone.pos_embed', r'backbone\.blocks\.1'],
                               trainable_norms=False)
    trainable = _trainable(model)
    assert 'backbone.pos_embed' in trainable
    assert {n for n in trainable if n.startswith('backbone.blocks.1.')} == {
        n for n, _ in model.named_parameters() if n.startswith('backbone.blocks.1.')}
    assert 'backbone.blocks.0.norm1.weight' not in trainable  # norms not kept
    assert 'backbone.norm.weight' in frozen
    assert 'backbone.blocks.0.attn.qkv.lora_A' in trainable
    assert set(frozen) == {n for n, _ in model.named_parameters()} - trainable


def test_trainable_modules_errors_and_prefix_errors():
    with pytest.raises(ValueError, match=r"\['backbone.blocks.7'\] match no module"):
        freeze_base_model(ToySegmentor(), trainable_modules=['backbone.blocks.7'])
    # exact matching: a bare child name is not enough
    with pytest.raises(ValueError, match='match no module'):
        freeze_base_model(ToySegmentor(), trainable_modules=['norm'])
    with pytest.raises(ValueError, match='neither an exact name nor a valid regular'):
        freeze_base_model(ToySegmentor(), trainable_modules=['backbone.(x'])
    with pytest.raises(ValueError, match=r"base prefix 'encoder' is not a submodule.*"
                       r"\['backbone', 'decode_head'\]"):
        freeze_base_model(ToySegmentor(), base_prefixes=['encoder'])


def test_whole_model_as_base_and_freeze_without_lora():
    model = ToySegmentor()
    freeze_base_model(model, base_prefixes=[''])
    assert all(isinstance(dict(model.named_modules())[n.rpartition('.')[0]],
                          (nn.LayerNorm, nn.GroupNorm)) for n in _trainable(model))
    assert 'decode_head.upscale.1.weight' in _trainable(model)  # GroupNorm kept by type


def test_count_parameters():
    model = apply_lora(ToySegmentor(), DEFAULT_CFG)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    d, r = 16, 4
    # per block: qkv (A r x d, B 3d x r), proj (r x d, d x r), fc1 (r x d, 2d x r), fc2 (r x 2d, d x r)
    per_block = r * d + 3 * d * r + r * d + d * r + r * d + 2 * d * r + r * 2 * d + d * r
    counts = count_parameters(model)
    assert counts == dict(total=total, trainable=trainable, lora=2 * per_block,
                          trainable_pct=pytest.approx(100.0 * trainable / total))
    assert count_parameters(nn.Module()) == dict(total=0, trainable=0, lora=0,
                                                 trainable_pct=0.0)


# -------------------------------------------------------------------------- optimizer
def _build_optim(model, paramwise_cfg=None, constructor='TrainableOnlyOptimWrapperConstructor'):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
               constructor=constructor)
    if paramwise_cfg is not None:
        cfg['paramwise_cfg'] = paramwise_cfg
    with DefaultScope.overwrite_default_scope('mmseg'):
        return build_optim_wrapper(model, cfg)


def _optim_params(optim_wrapper):
    return [p for g in optim_wrapper.optimizer.param_groups for p in g['params']]


def test_mmengine_default_constructor_keeps_frozen_params():
    # Why our constructor exists: without paramwise_cfg mmengine hands every parameter,
    # frozen ones included, to the optimizer.
    model = apply_lora(ToySegmentor(), DEFAULT_CFG)
    wrapper = _build_optim(model, constructor='DefaultOptimWrapperConstructor')
    assert any(not p.requires_grad for p in _optim_params(wrapper))


@pytest.mark.parametrize('paramwise_cfg', [
    None,
    dict(custom_keys={'lora_': dict(lr_mult=10.0, decay_mult=0.0)}, norm_decay_mult=0.0),
])
def test_trainable_only_constructor_step(paramwise_cfg):
    model = apply_lora(ToySegmentor(), DEFAULT_CFG)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    import logging

    from mmengine.logging import MMLogger
    records = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        wrapper = _build_optim(model, paramwise_cfg)
    finally:
        logger.removeHandler(handler)
    # one summary line instead of mmengine's warning per frozen parameter
    assert not any('requires_grad=False' in r for r in records)
    n_frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    assert f'{n_frozen} frozen parameter tensors left out of the optimizer' in records
    in_optim = {id(p) for p in _optim_params(wrapper)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert in_optim == {id(p) for p in model.parameters() if p.requires_grad}
    model(torch.randn(2, 3, 16, 16)).backward()
    wrapper.step()
    state_ids = {id(p) for p in wrapper.optimizer.state}
    assert state_ids == in_optim  # every trainable param has state, no frozen one has
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    if paramwise_cfg is not None:
        groups = {names[id(g['params'][0])]: g for g in wrapper.optimizer.param_groups}
        lora_g = groups['backbone.blocks.0.attn.qkv.lora_A']
        assert lora_g['lr'] == pytest.approx(1e-2) and lora_g['weight_decay'] == 0.0
        assert groups['backbone.norm.weight']['weight_decay'] == 0.0
        assert groups['decode_head.class_head.weight']['weight_decay'] == pytest.approx(0.05)
        assert groups['decode_head.class_head.weight']['lr'] == pytest.approx(1e-3)


def test_trainable_only_constructor_errors():
    model = apply_lora(ToySegmentor(), DEFAULT_CFG)
    with pytest.raises(ValueError, match="base_constructor='Nope' is not a registered"):
        _build_optim(model, dict(base_constructor='Nope'))
    frozen = ToySegmentor().requires_grad_(False)
    with pytest.raises(ValueError, match='no trainable parameter'):
        _build_optim(frozen)


# ------------------------------------------------------------- mmseg model + WithLoRA
def _seg_cfg(lora_config):
    backbone = dict(
        type='mmpretrain.VisionTransformer',
        arch=dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64),
        img_size=32, patch_size=8, out_type='featmap', final_norm=True,
        layer_scale_init_value=1e-5)
    return dict(
        type='WithLoRA',
        model=dict(
            type='EncoderDecoder',
            data_preprocessor=dict(type='SegDataPreProcessor', mean=[0, 0, 0],
                                   std=[1, 1, 1], size=(32, 32)),
            backbone=backbone,
            decode_head=dict(type='FCNHead', in_channels=32, channels=16, num_convs=1,
                             concat_input=False, num_classes=3, in_index=-1,
                             norm_cfg=dict(type='BN', requires_grad=True),
                             loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0,
                                                avg_non_ignore=True)),
            train_cfg=dict(), test_cfg=dict(mode='whole')),
        lora_config=lora_config)


def _seg_batch():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 32, 32)))
        s.set_metainfo(dict(img_shape=(32, 32), ori_shape=(32, 32), pad_shape=(32, 32)))
        samples.append(s)
    return torch.randn(2, 3, 32, 32), samples


def test_with_lora_builds_mmseg_encoder_decoder():
    from mmseg.models import EncoderDecoder
    from mmseg.registry import MODELS
    model = MODELS.build(_seg_cfg(DEFAULT_CFG))
    assert type(model) is EncoderDecoder  # the inner model itself, not a wrapper
    lora_names = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert lora_names == sorted(f'backbone.layers.{i}.{s}' for i in range(2)
                                for s in ('attn.qkv', 'attn.proj', 'ffn.layers.0.0',
                                          'ffn.layers.1'))
    trainable = _trainable(model)
    norms = {f'backbone.{m}.{p}' for m, mod in model.backbone.named_modules()
             if isinstance(mod, nn.LayerNorm) for p, _ in mod.named_parameters()}
    assert 'backbone.layers.1.ln2.weight' in norms and 'backbone.ln1.weight' in norms
    assert {n for n in trainable if n.startswith('backbone.')} == norms | {
        f'{n}.{p}' for n in lora_names for p in ('lora_A', 'lora_B')}
    assert all(p.requires_grad for p in model.decode_head.parameters())
    assert not model.backbone.pos_embed.requires_grad
    assert not model.backbone.layers[0].attn.gamma1.weight.requires_grad  # layer scale: frozen
    # one training step through the mmseg loss path
    inputs, samples = _seg_batch()
    losses = model.loss(inputs, samples)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_with_lora_plain_checkpoint_loads_through_init_weights(tmp_path):
    from mmseg.registry import MODELS
    plain = MODELS.build(_seg_cfg(None))
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    ckpt = tmp_path / 'backbone.pth'
    torch.save(plain.backbone.state_dict(), ckpt)
    cfg = _seg_cfg(DEFAULT_CFG)
    cfg['model']['backbone']['init_cfg'] = dict(type='Pretrained', checkpoint=str(ckpt))
    adapted = MODELS.build(cfg)
    adapted.init_weights()
    for k, v in plain.backbone.state_dict().items():
        assert torch.equal(adapted.backbone.state_dict()[k], v), k
    plain.eval(), adapted.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(adapted.backbone(x)[0], plain.backbone(x)[0])
    # requires_grad is untouched by init_weights
    assert not adapted.backbone.layers[0].attn.qkv.weight.requires_grad


def test_layer_decay_constructor_through_trainable_only():
    from mmseg.registry import MODELS
    model = MODELS.build(_seg_cfg(DEFAULT_CFG))
    wrapper = _build_optim(
        model,
        dict(base_constructor='mmpretrain.LearningRateDecayOptimWrapperConstructor',
             layer_decay_rate=0.5, custom_keys={'lora_': dict(decay_mult=0.0)}))
    ids = {id(p) for p in _optim_params(wrapper)}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}
    # deeper blocks get larger lrs; the head the largest
    a0 = lr_of['backbone.layers.0.attn.qkv.lora_A']
    a1 = lr_of['backbone.layers.1.attn.qkv.lora_A']
    head = lr_of['decode_head.conv_seg.weight']
    assert a0 < a1 < head
    assert a1 / a0 == pytest.approx(2.0)


def test_runner_trains_with_lora_config_end_to_end(tmp_path):
    """The Runner builds 'WithLoRA' from a config and trains: only trainables change."""
    from mmengine.dataset import pseudo_collate
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    from torch.utils.data import DataLoader

    class Snapshot(Hook):
        # after the Runner's init_weights (which re-initialises pos_embed), before step 1
        def before_train(self, runner):
            self.params = {n: p.detach().clone()
                           for n, p in runner.model.named_parameters()}

    snap = Snapshot()

    inputs, samples = _seg_batch()
    data = [dict(inputs=inputs[i].mul(50).add(128).clamp(0, 255).to(torch.uint8),
                 data_samples=samples[i]) for i in range(2)]
    loader = DataLoader(data, batch_size=2, collate_fn=pseudo_collate)
    runner = Runner(
        model=_seg_cfg(dict(DEFAULT_CFG, lora_dropout=0.1)),
        work_dir=str(tmp_path),
        train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=3, val_interval=100),
        optim_wrapper=dict(
            type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.05),
            constructor='TrainableOnlyOptimWrapperConstructor',
            paramwise_cfg=dict(custom_keys={'lora_': dict(lr_mult=2.0, decay_mult=0.0)})),
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[snap],
        default_scope='mmseg')
    model = runner.model
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    runner.train()
    before = snap.params
    optim = runner.optim_wrapper.optimizer
    in_optim = {id(p) for g in optim.param_groups for p in g['params']}
    for n, p in model.named_parameters():
        assert (id(p) in in_optim) == p.requires_grad, n
        assert (p in optim.state) == p.requires_grad, n
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f'frozen {n} changed'
    lora_b = model.backbone.layers[1].attn.qkv.lora_B
    assert not torch.equal(lora_b, before['backbone.layers.1.attn.qkv.lora_B'])
    assert not torch.equal(model.decode_head.conv_seg.weight,
                           before['decode_head.conv_seg.weight'])


def test_adapter_enabled_config_switch_gives_base_outputs_with_lora_weights_loaded():
    """``adapter_enabled=False``: same modules and keys, adapters off -> base model outputs."""
    torch.manual_seed(0)
    base = ToySegmentor()
    trained = apply_lora(ToySegmentor(), DEFAULT_CFG)
    trained.load_state_dict(base.state_dict(), strict=False)
    for name, p in trained.named_parameters():
        if name.endswith('lora_B'):
            torch.nn.init.normal_(p)  # an adapter that changes the output
    switched_off = apply_lora(ToySegmentor(), dict(DEFAULT_CFG, adapter_enabled=False))
    switched_off.load_state_dict(trained.state_dict())  # strict: LoRA keys are all there
    img = torch.randn(2, 3, 16, 16)
    for m in (base, trained, switched_off):
        m.eval()
    assert not torch.allclose(trained(img), base(img))
    assert torch.equal(switched_off(img), base(img))
    with pytest.raises(ValueError, match='adapter_enabled must be a bool'):
        apply_lora(ToySegmentor(), dict(DEFAULT_CFG, adapter_enabled='no'))
