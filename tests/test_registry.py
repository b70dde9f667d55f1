"""``import eomt_mm`` registers every component the README lists, in the host registries."""
import mmengine.registry as engine_registry
import mmseg.registry as seg_registry
import pytest

EXPECTED = [
    (engine_registry.MODELS, ['LoRALinear']),
    (engine_registry.MODEL_WRAPPERS, ['CpuAwareDistributedDataParallel']),
    (seg_registry.MODELS, ['EoMT', 'EoMTDecoder', 'DINOv2', 'WithLoRA', 'RbALoss']),
    (seg_registry.HOOKS, ['MaskAnnealingHook', 'TrainableParamsHook', 'LoRACheckpointHook',
                          'RNGStateHook', 'AnomalyVisHook']),
    (seg_registry.PARAM_SCHEDULERS, ['TwoStageWarmupPolyLR']),
    (seg_registry.OPTIM_WRAPPER_CONSTRUCTORS, ['TrainableOnlyOptimWrapperConstructor']),
    (seg_registry.METRICS, ['AnomalyMetric']),
    (seg_registry.DATASETS, ['AnomalyFolderDataset', 'RoadAnomaly21Dataset',
                             'RoadObstacle21Dataset', 'RoadAnomalyDataset',
                             'FishyscapesStaticDataset', 'FishyscapesLostFoundDataset',
                             'SMIYCDataset', 'LostAndFoundDataset']),
    (seg_registry.TRANSFORMS, ['LoadImageFromFileChecked', 'LoadAnnotationsChecked',
                               'RemapAnomalyLabels', 'PasteOutliers']),
]


@pytest.mark.parametrize('registry,names', EXPECTED, ids=lambda r: getattr(r, 'name', None))
def test_components_are_registered_in_the_host_registry(registry, names):
    missing = [n for n in names if n not in registry.module_dict]
    assert not missing, f'not registered in {registry.scope}::{registry.name}: {missing}'
