"""Anomaly segmentation on top of EoMT: one folder for everything anomaly-specific.

* scores of mask-transformer outputs (:mod:`.scores`), the anomaly-enabled segmentor
  ``AnomalyEoMT`` (:mod:`.segmentor`) and the outlier-exposure losses (:mod:`.outlier_loss`);
* outlier exposure data: ``PasteOutliers`` (:mod:`.paste_outliers`);
* the benchmarks' datasets and label remapping (:mod:`.datasets`, :mod:`.label_remap`);
* evaluation: ``AnomalyMetric`` with the exact pooled pixel metrics and the component metrics,
  and ``AnomalyVisHook``.
"""
from .component_metrics import aggregate_component_stats, frame_component_stats  # noqa: F401
from .datasets import (AnomalyFolderDataset, FishyscapesLostFoundDataset,  # noqa: F401
                       FishyscapesStaticDataset, LostAndFoundDataset, RoadAnomaly21Dataset,
                       RoadAnomalyDataset, RoadObstacle21Dataset, SMIYCDataset)
from .label_remap import RemapAnomalyLabels, build_label_lut  # noqa: F401
from .metric import AnomalyMetric  # noqa: F401
from .outlier_loss import OutlierExposureLoss, RbALoss, rba_hinge_loss, rba_score  # noqa: F401
from .paste_outliers import PasteOutliers  # noqa: F401
from .pixel_metrics import (PixelMetrics, pixel_metrics_from_arrays,  # noqa: F401
                            pooled_pixel_metrics, split_by_label)
from .scores import SCORE_NAMES, compute_anomaly_scores, semantic_map  # noqa: F401
from .segmentor import AnomalyEoMT  # noqa: F401
from .visualization import AnomalyVisHook, anomaly_panel  # noqa: F401
from .ensemble import AdapterEnsembleEoMT, SaveMemberAdaptersHook  # noqa: F401,E402
