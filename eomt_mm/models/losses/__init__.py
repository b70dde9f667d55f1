from .mask_classification_loss import MaskClassificationLoss  # noqa: F401
