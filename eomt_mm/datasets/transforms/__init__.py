from .paste_outliers import PasteOutliers  # noqa: F401
from .remap_anomaly_labels import RemapAnomalyLabels, build_label_lut  # noqa: F401
from .checked_loading import (CorruptImageError, LoadAnnotationsChecked,  # noqa: F401
                              LoadImageFromFileChecked)
