"""tools/eval_anomaly.py evaluates an adapter ensemble like a single model (both protocols)."""
import importlib.util
import os.path as osp

import pytest
import torch
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

from mmengine.runner import load_checkpoint

from eomt_mm.lora.adapters import adapter_state_keys, read_adapter, save_adapter

from test_anomaly_eval_tool import DATASET_CFG, MODEL_CFG, _folder

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
LORA = "lora_config=dict(rank=2, layers={'last': 1}, trainable_norms=False),\n"


@pytest.mark.slow
def test_eval_tool_runs_an_ensemble_of_adapter_folders(tmp_path, capsys):
    init_default_scope('mmseg')
    single_cfg = MODEL_CFG.replace("test_cfg=dict(mode='whole'))",
                                   "test_cfg=dict(mode='whole'),\n    " + LORA + ")")
    ns = {}
    exec(single_cfg, ns)
    torch.manual_seed(0)
    single = MODELS.build(ns['model'])
    ckpt = tmp_path / 'base.pth'
    torch.save({'state_dict': single.state_dict(), 'meta': {}}, ckpt)
    folders = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        live = dict(single.state_dict(keep_vars=True))
        with torch.no_grad():
            for key in adapter_state_keys(single):
                live[key].add_(0.3 * torch.randn(live[key].shape, generator=gen))
        folders.append(save_adapter(single, str(tmp_path / f'member{seed}')))
    cfg_path = tmp_path / 'ensemble.py'
    cfg_path.write_text(single_cfg.replace("type='EoMT'", "type='AdapterEnsembleEoMT'").replace(
        LORA, LORA + f'    adapters={folders!r},\n'))
    root = tmp_path / 'ra'
    _folder(root, 1)
    ds_cfg = tmp_path / 'anomaly_ra.py'
    ds_cfg.write_text(DATASET_CFG.format(type='RoadAnomalyDataset', root=root, extra=''))
    spec = importlib.util.spec_from_file_location('eval_anomaly',
                                                  osp.join(ROOT, 'tools', 'eval_anomaly.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results = tool.main([str(cfg_path), str(ckpt), '--datasets', f'ra={ds_cfg}', '--scores',
                         'msp', 'rba', '--out-dir', str(tmp_path / 'out'), '--protocol',
                         'exact', 'smiyc'])
    for score in ('msp', 'rba'):
        for key in (f'{score}/AuPRC', f'smiyc/{score}/AuPRC', f'{score}/FPR95'):
            assert 0 <= results['ra'][key] <= 100
    assert 'AuPRC' in capsys.readouterr().out
    # Loading the single-model base checkpoint keeps every member's own adapter values.
    ns = {}
    exec(cfg_path.read_text(), ns)
    ensemble = MODELS.build(ns['model'])
    load_checkpoint(ensemble, str(ckpt), map_location='cpu')
    for k, folder in enumerate(folders):
        tensors, _ = read_adapter(folder)
        for key, value in ensemble.member_state(k).items():
            torch.testing.assert_close(value, tensors[key], rtol=0, atol=0)
