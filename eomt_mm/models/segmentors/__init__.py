from .eomt import EoMT

__all__ = ['EoMT']
