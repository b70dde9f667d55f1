from .checked_loading import (CorruptImageError, LoadAnnotationsChecked,  # noqa: F401
                              LoadImageFromFileChecked)
