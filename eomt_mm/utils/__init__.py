"""Weight conversion and ViT resampling helpers (no model imports at module level)."""
from .resample import resample_patch_kernel, resize_pos_embed_grid
from .weight_converters import (DECODER_KEY_MAP, FORMATS, CheckpointConversionError,
                                convert_file, convert_state_dict, load_source_state_dict,
                                save_converted)

__all__ = [
    'resample_patch_kernel', 'resize_pos_embed_grid', 'DECODER_KEY_MAP', 'FORMATS',
    'CheckpointConversionError', 'convert_file', 'convert_state_dict', 'load_source_state_dict',
    'save_converted'
]
