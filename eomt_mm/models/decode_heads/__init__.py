from .eomt_decoder import EoMTDecoder

__all__ = ['EoMTDecoder']
