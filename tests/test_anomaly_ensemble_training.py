"""Joint training of ensemble members equals training each member alone."""
import copy

import torch
from mmengine.optim import OptimWrapper
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from eomt_mm.anomaly.ensemble import save_member_adapters
from eomt_mm.lora.adapters import adapter_state_keys, load_adapter, read_adapter
from eomt_mm.lora.adapters.state import lora_layers

LORA = dict(rank=4, lora_alpha=8, lora_dropout=0.2, layers={'last': 2},
            trainable_norms=False,
            trainable_modules=[r'backbone\.layers\.[23]\.ln[12]', 'backbone.ln1'])
SEEDS = [11, 22]
MAX_NORM = 0.05  # small enough that every step clips


def _cfg(model_type, **kw):
    return dict(
        type=model_type,
        data_preprocessor=dict(type='mmseg.SegDataPreProcessor', mean=[0.0] * 3, std=[1.0] * 3,
                               size=(32, 32), pad_val=0, seg_pad_val=255),
        backbone=dict(type='DINOv2', arch=dict(embed_dims=32, num_layers=4, num_heads=2,
                                               feedforward_channels=64),
                      img_size=32, patch_size=8, num_register_tokens=2),
        decoder=dict(type='EoMTDecoder', num_classes=3, num_queries=5, num_blocks=2,
                     num_points=64),
        lora_config=LORA, **dict(dict(outlier_loss=dict(type='RbALoss')), **kw))


def _batches(num=3):
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(num):
        samples, imgs = [], []
        for _ in range(2):
            label = torch.randint(0, 3, (4, 4), generator=gen).repeat_interleave(8, 0)
            label = label.repeat_interleave(8, 1)
            label[torch.rand(32, 32, generator=gen) < 0.1] = 254  # pasted outliers
            sample = SegDataSample(metainfo=dict(img_shape=(32, 32), ori_shape=(32, 32)))
            sample.gt_sem_seg = PixelData(data=label[None])
            samples.append(sample)
            imgs.append(torch.rand(3, 32, 32, generator=gen) * 255)
        out.append(dict(inputs=imgs, data_samples=samples))
    return out


def _train(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    clip = None if model.__class__.__name__ == 'AdapterEnsembleEoMT' else dict(max_norm=MAX_NORM)
    wrapper = OptimWrapper(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
                           clip_grad=clip)
    model.train()
    # Masked attention with a keep probability below 1 draws per-query randomness too.
    model.decoder.attn_mask_probs.fill_(0.5)
    logs = [model.train_step(copy.deepcopy(b), wrapper) for b in batches]
    return logs


def test_joint_run_equals_separate_runs(tmp_path):
    torch.manual_seed(0)
    base = MODELS.build(_cfg('AnomalyEoMT'))
    base_state = copy.deepcopy(base.state_dict())
    batches = _batches()

    separate = []
    for seed in SEEDS:
        single = MODELS.build(_cfg('AnomalyEoMT'))
        single.load_state_dict(base_state)
        torch.manual_seed(seed)  # the member's stream: LoRA A init, then training draws
        for layer in lora_layers(single).values():
            layer.reset_lora_parameters()
        _train(single, batches)
        separate.append(single)

    # Built like the base (same initialisation); members start from its values, LoRA A redrawn
    # from each member's stream.
    torch.manual_seed(0)
    ensemble = MODELS.build(_cfg('AdapterEnsembleEoMT', member_seeds=SEEDS,
                                 member_clip_grad=dict(max_norm=MAX_NORM)))
    missing, unexpected = ensemble.load_state_dict(base_state, strict=True)
    torch.manual_seed(123)  # the global stream does not matter: members draw from their own
    logs = _train(ensemble, batches)
    assert {'m0.loss_cls', 'm1.loss_rba', 'm0.grad_norm'} <= set(logs[0])
    assert all(float(log['m1.grad_norm']) > MAX_NORM for log in logs)  # clipping was active

    keys = list(adapter_state_keys(separate[0]))
    assert keys == list(ensemble.member_layout)
    for k, single in enumerate(separate):
        want = dict(single.state_dict())
        got = ensemble.member_state(k)
        moved = 0
        for key in keys:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
            moved += int(not torch.equal(want[key], base_state[key]))
        assert moved == len(keys)  # every member tensor trained
    # The members differ from each other (own seeds), so the test compares real runs.
    assert not torch.allclose(ensemble.member_state(0)[keys[0]], ensemble.member_state(1)[keys[0]])

    # Each member saves as an ordinary adapter that a single model loads and runs alone.
    folders = save_member_adapters(ensemble, str(tmp_path))
    tensors, config = read_adapter(folders[1])
    assert set(tensors) == set(keys) and config['metadata']['member_seed'] == SEEDS[1]
    single = MODELS.build(_cfg('AnomalyEoMT'))
    single.load_state_dict(base_state)
    load_adapter(single, folders[1], 'm1', check_base='error')
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        masks, classes = ensemble.eval().forward_logits(img)
        want_masks, want_classes = single.eval().forward_logits(img)
    torch.testing.assert_close(ensemble.split_members(masks)[1], want_masks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ensemble.split_members(classes)[1], want_classes, rtol=1e-5,
                               atol=1e-5)


def test_loss_from_predictions_is_the_loss_of_a_pass():
    """``AnomalyEoMT.loss`` = ``loss_from_predictions`` of ``run_network`` (what members use)."""
    for outlier_loss in (dict(type='RbALoss'), None):
        torch.manual_seed(0)
        model = MODELS.build(_cfg('AnomalyEoMT', outlier_loss=outlier_loss)).train()
        model.decoder.attn_mask_probs.fill_(0.5)
        batch = model.data_preprocessor(copy.deepcopy(_batches(1)[0]), True)
        if outlier_loss is None:  # no pasted outliers without outlier exposure
            for sample in batch['data_samples']:
                sample.gt_sem_seg.data[sample.gt_sem_seg.data == 254] = 255
        torch.manual_seed(4)
        want = model.loss(batch['inputs'], batch['data_samples'])
        torch.manual_seed(4)
        predictions = model.run_network(batch['inputs'], masked_attn=True)
        got = model.loss_from_predictions(predictions, batch['data_samples'])
        assert got.keys() == want.keys() and ('loss_rba' in got) == (outlier_loss is not None)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
