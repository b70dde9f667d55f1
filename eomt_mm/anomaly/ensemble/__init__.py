"""Adapter ensembles sharing one frozen EoMT base: K anomaly detectors for little more than one.

* :class:`AdapterEnsembleEoMT` (:mod:`.segmentor`): the registered segmentor (prefix once,
  K members batched), its decoder :class:`EnsembleEoMTDecoder` (:mod:`.decoder`) and the
  member-stacked modules (:mod:`.stacked`);
* ensemble and disagreement scores (:mod:`.scores`);
* which tensors members own and the refusal of prefix adapters (:mod:`.members`);
* per-member random streams (:mod:`.rng`) and joint training (:mod:`.training`).
"""
from .decoder import EnsembleEoMTDecoder  # noqa: F401
from .members import PrefixAdapterError  # noqa: F401
from .rng import MemberStreams  # noqa: F401
from .scores import (DISAGREEMENT_SCORE_NAMES, ENSEMBLE_SCORE_NAMES,  # noqa: F401
                     ensemble_anomaly_scores, member_score_name)
from .segmentor import AdapterEnsembleEoMT  # noqa: F401
from .stacked import StackedLoRALinear, StackedModule  # noqa: F401
from .training import (SaveMemberAdaptersHook, clip_member_gradients,  # noqa: F401
                       save_member_adapters)
