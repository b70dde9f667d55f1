"""Adapter ensembles (eomt_mm.anomaly.ensemble): one shared prefix, K members batched."""
import copy

import pytest
import torch
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from eomt_mm.anomaly.ensemble import PrefixAdapterError, ensemble_anomaly_scores
from eomt_mm.anomaly.scores import compute_anomaly_scores, semantic_map
from eomt_mm.lora import count_parameters
from eomt_mm.lora.adapters import adapter_state_keys, load_adapter, save_adapter

SCORES = ['msp', 'maxlogit', 'entropy', 'energy', 'rba', 'eam']
LORA = dict(rank=4, lora_alpha=8, lora_dropout=0.1, layers={'last': 2},
            trainable_norms=False,
            trainable_modules=[r'backbone\.layers\.[23]\.ln[12]', 'backbone.ln1'])


def _cfg(model_type='AnomalyEoMT', lora=None, test_cfg=None, **kw):
    return dict(
        type=model_type,
        backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=4, num_heads=2,
                                               feedforward_channels=64),
                      img_size=32, patch_size=8, num_register_tokens=2),
        decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=5, num_blocks=2,
                     num_points=64),
        lora_config=dict(LORA, **(lora or {})),
        test_cfg=test_cfg or dict(mode='whole', anomaly_scores=SCORES), **kw)


def _trained_single(seed, base_state=None):
    """A single model with a non-trivial adapter (random LoRA B, perturbed heads)."""
    torch.manual_seed(0)
    model = MODELS.build(_cfg())
    if base_state is not None:
        model.load_state_dict(base_state)
    gen = torch.Generator().manual_seed(seed)
    live = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for key in adapter_state_keys(model):
            live[key].add_(0.2 * torch.randn(live[key].shape, generator=gen))
    return model.eval()


def _ensemble(adapters=None, seeds=None, test_cfg=None, base=None, **kw):
    model = MODELS.build(_cfg('AdapterEnsembleEoMT', adapters=adapters, member_seeds=seeds,
                              test_cfg=test_cfg, **kw))
    if base is not None:
        shared = {k: v for k, v in base.state_dict().items() if k not in model.member_layout}
        missing, unexpected = model.load_state_dict(shared, strict=False)
        assert not unexpected and set(missing) == set(model.member_layout)
    return model


@pytest.fixture(scope='module')
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp('adapters')
    base = _trained_single(0)
    base_state = copy.deepcopy(base.state_dict())
    folders = []
    for seed in (1, 2, 3):
        folders.append(save_adapter(_trained_single(seed, base_state), str(root / f'a{seed}')))
    return base_state, folders


def _single_with(base_state, folder, test_cfg=None):
    torch.manual_seed(0)
    model = MODELS.build(_cfg(test_cfg=test_cfg))
    model.load_state_dict(base_state)
    load_adapter(model, folder, 'member', check_base='error')
    return model.eval()


def _images(batch=2, seed=5):
    return torch.randn(batch, 3, 32, 48, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_k_copies_of_one_adapter_give_the_single_model(adapters, mode):
    base_state, folders = adapters
    test_cfg = dict(mode=mode, anomaly_scores=SCORES + ['mutual_info', 'rba_variance'])
    single_cfg = dict(mode=mode, anomaly_scores=SCORES)
    if mode == 'slide':
        test_cfg['crop_size'] = single_cfg['crop_size'] = 32
    single = _single_with(base_state, folders[0], single_cfg)
    ensemble = _ensemble([folders[0]] * 3, test_cfg=test_cfg, base=single).eval()
    img = _images()
    with torch.no_grad():
        want = single.predict(img, [SegDataSample(), SegDataSample()])
        got = ensemble.predict(img, [SegDataSample(), SegDataSample()])
    for w, g in zip(want, got):
        torch.testing.assert_close(g.seg_logits.data, w.seg_logits.data, rtol=1e-5, atol=1e-6)
        assert torch.equal(g.pred_sem_seg.data, w.pred_sem_seg.data)
        for name in SCORES:
            torch.testing.assert_close(g.anomaly_scores.get(name), w.anomaly_scores.get(name),
                                       rtol=1e-5, atol=1e-5)
        # Identical members never disagree.
        assert g.anomaly_scores.mutual_info.abs().max() < 1e-5
        assert g.anomaly_scores.rba_variance.abs().max() < 1e-8


def test_members_with_different_adapters_equal_each_adapter_alone(adapters):
    base_state, folders = adapters
    singles = [_single_with(base_state, f) for f in folders]
    ensemble = _ensemble(folders, test_cfg=dict(mode='whole', anomaly_scores=['msp'],
                                                member_scores=SCORES), base=singles[0]).eval()
    img = _images()
    with torch.no_grad():
        masks, classes = ensemble.forward_logits(img)
        got = ensemble.predict(img, [SegDataSample(), SegDataSample()])
        for k, single in enumerate(singles):
            want_masks, want_classes = single.forward_logits(img)
            torch.testing.assert_close(ensemble.split_members(masks)[k], want_masks,
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ensemble.split_members(classes)[k], want_classes,
                                       rtol=1e-5, atol=1e-5)
            want = single.predict(img, [SegDataSample(), SegDataSample()])
            for g, w in zip(got, want):
                for name in SCORES:
                    torch.testing.assert_close(g.anomaly_scores.get(f'{name}_m{k}'),
                                               w.anomaly_scores.get(name), rtol=1e-5, atol=1e-5)
        mean = sum(s.inference(img).seg_logits for s in singles) / len(singles)
    torch.testing.assert_close(ensemble.inference(img).seg_logits, mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('num_members', [1, 2, 4])
def test_prefix_blocks_run_once_per_image_whatever_k(adapters, num_members):
    base_state, folders = adapters
    ensemble = _ensemble([folders[0]] * num_members).eval()
    calls = []
    original = ensemble.backbone.forward_block

    def counting(index, x, attn_mask=None):
        calls.append((index, x.shape[0]))
        return original(index, x, attn_mask)

    ensemble.backbone.forward_block = counting
    with torch.no_grad():
        ensemble.inference(_images(batch=3))
    first = ensemble.first_query_block
    # Every block runs once: the prefix on the 3 images, the query blocks on all members at once.
    assert calls == [(i, 3) for i in range(first)] + [(i, 3 * num_members)
                                                      for i in range(first, 4)]


def test_adapters_reaching_below_the_query_blocks_are_refused(tmp_path, adapters):
    torch.manual_seed(0)
    everywhere = MODELS.build(_cfg(lora=dict(layers=None)))
    folder = save_adapter(everywhere, str(tmp_path / 'all_blocks'))
    with pytest.raises(PrefixAdapterError,
                       match=r'block 0 \(backbone\.layers\.0\).*first query block 2'):
        _ensemble([folder, adapters[1][0]])
    with pytest.raises(PrefixAdapterError, match=r'block 1 \(backbone\.layers\.1\)'):
        MODELS.build(_cfg('AdapterEnsembleEoMT', lora=dict(layers={'last': 3}),
                          member_seeds=[0, 1]))
    with pytest.raises(PrefixAdapterError, match=r'block 0 \(backbone\.layers\.0\)'):
        MODELS.build(_cfg('AdapterEnsembleEoMT', lora=dict(trainable_norms=True,
                                                           trainable_modules=[]),
                          member_seeds=[0, 1]))
    with pytest.raises(PrefixAdapterError, match='embedding stage'):
        MODELS.build(_cfg('AdapterEnsembleEoMT',
                          lora=dict(trainable_modules=['backbone.pos_embed']),
                          member_seeds=[0, 1]))


def test_ensemble_scores_follow_their_formulas():
    gen = torch.Generator().manual_seed(0)
    classes = torch.randn(3, 2, 5, 4, generator=gen) * 3
    masks = torch.randn(3, 2, 5, 6, 7, generator=gen) * 3
    names = SCORES + ['mutual_info', 'rba_variance']
    scores = ensemble_anomaly_scores(classes, masks, names, chunk_pixels=10)
    sem = torch.stack([semantic_map(classes[k], masks[k]) for k in range(3)])  # [K, B, C, H, W]
    mean = sem.mean(0)
    torch.testing.assert_close(scores['msp'], 1 - mean.amax(1))
    torch.testing.assert_close(scores['rba'], -torch.tanh(mean).sum(1))
    torch.testing.assert_close(scores['energy'], -torch.logsumexp(mean, 1))
    logit_map = torch.stack([torch.einsum('bqc,bqhw->bchw', classes[k, ..., :-1],
                                          masks[k].sigmoid()) for k in range(3)]).mean(0)
    torch.testing.assert_close(scores['maxlogit'], -logit_map.amax(1))
    member_eam = torch.stack([compute_anomaly_scores(classes[k], masks[k], 'eam')['eam']
                              for k in range(3)])
    torch.testing.assert_close(scores['eam'], member_eam.mean(0))
    dist = sem / sem.sum(2, keepdim=True)
    entropy = -(dist * dist.log()).sum(2)  # [K, B, H, W]
    mean_dist = dist.mean(0)
    torch.testing.assert_close(scores['mutual_info'],
                               -(mean_dist * mean_dist.log()).sum(1) - entropy.mean(0))
    assert (scores['mutual_info'] > -1e-6).all()  # Jensen: never negative
    member_rba = -torch.tanh(sem).sum(2)
    torch.testing.assert_close(scores['rba_variance'], member_rba.var(0, unbiased=False))
    with pytest.raises(ValueError, match='valid names'):
        ensemble_anomaly_scores(classes, masks, ['bald'])


def test_config_errors_are_clear(adapters):
    with pytest.raises(ValueError, match='give adapters'):
        MODELS.build(_cfg('AdapterEnsembleEoMT'))
    with pytest.raises(ValueError, match='one seed per adapter'):
        MODELS.build(_cfg('AdapterEnsembleEoMT', adapters=adapters[1][:2], member_seeds=[0]))
    with pytest.raises(ValueError, match='checkpoint_blocks'):
        MODELS.build(_cfg('AdapterEnsembleEoMT', member_seeds=[0, 1], checkpoint_blocks=3))


def test_count_parameters_counts_every_members_lora():
    torch.manual_seed(0)
    single = MODELS.build(_cfg())
    ensemble = MODELS.build(_cfg('AdapterEnsembleEoMT', member_seeds=[0, 1, 2]))
    one, three = count_parameters(single), count_parameters(ensemble)
    lora = sum(p.numel() for n, p in single.named_parameters() if n.endswith(('.lora_A',
                                                                              '.lora_B')))
    assert one['lora'] == lora > 0
    assert three['lora'] == 3 * lora
    assert three['trainable'] == 3 * one['trainable']
    # The frozen base is shared by the members, not copied.
    assert three['total'] - three['trainable'] == one['total'] - one['trainable']


def test_stacked_modules_equal_each_member_alone():
    """Each way of running members (batched norm, vmap, in turn) gives every member's output."""
    from torch import nn

    from eomt_mm.anomaly.ensemble import StackedModule
    gen = torch.Generator().manual_seed(0)
    norm = nn.LayerNorm(6)
    head = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU())
    cases = [(norm, ['weight', 'bias'], 'layer_norm', (3, 7, 6)),
             (nn.LayerNorm(6), ['weight'], 'layer_norm', (3, 6)),
             (head, ['0.weight', '0.bias', '2.weight'], 'vmap', (3, 2, 6)),
             (conv, ['0.weight', '0.bias'], 'members_in_turn', (3, 3, 5, 5))]
    for module, names, strategy, shape in cases:
        live = dict(module.named_parameters())
        values = {n: live[n].detach() + torch.randn(2, *live[n].shape, generator=gen)
                  for n in names}
        stacked = StackedModule(copy.deepcopy(module), values)
        assert stacked.strategy == strategy
        assert set(dict(stacked.named_parameters())) == set(live)  # the single model's keys
        x = torch.randn(2 * shape[0], *shape[1:], generator=gen)
        got = stacked(x)
        for k in range(2):
            own = {n: values[n][k] if n in values else p for n, p in live.items()}
            want = torch.func.functional_call(module, own, (x[k * shape[0]:(k + 1) * shape[0]], ))
            torch.testing.assert_close(got[k * shape[0]:(k + 1) * shape[0]], want, rtol=1e-5,
                                       atol=1e-6)
