from .mask_classification_loss import MaskClassificationLoss  # noqa: F401
from .rba_loss import RbALoss, rba_hinge_loss, rba_score  # noqa: F401
