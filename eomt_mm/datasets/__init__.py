from . import transforms  # noqa: F401
from .demo_roads import demo_dataset_is_current, generate_demo_dataset  # noqa: F401
from .anomaly_datasets import (AnomalyFolderDataset, FishyscapesLostFoundDataset,  # noqa: F401
                               FishyscapesStaticDataset, LostAndFoundDataset,
                               RoadAnomaly21Dataset, RoadAnomalyDataset,
                               RoadObstacle21Dataset, SMIYCDataset)
