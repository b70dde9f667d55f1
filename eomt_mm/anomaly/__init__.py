"""Anomaly segmentation: scores from mask-transformer outputs, exact pooled metrics."""
from .component_metrics import aggregate_component_stats, frame_component_stats  # noqa: F401
from .metric import AnomalyMetric  # noqa: F401
from .pixel_metrics import (PixelMetrics, pixel_metrics_from_arrays,  # noqa: F401
                            pooled_pixel_metrics, split_by_label)
from .scores import SCORE_NAMES, compute_anomaly_scores, semantic_map  # noqa: F401
from .visualization import AnomalyVisHook, anomaly_panel  # noqa: F401
