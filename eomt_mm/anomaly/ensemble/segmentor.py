"""``AdapterEnsembleEoMT``: K LoRA adapters of one frozen base sharing the prefix blocks.

With LoRA restricted to the query blocks (``lora_config.layers={'last': L2}``) and the base frozen,
blocks ``0 .. L - L2 - 1`` compute the same tokens for every adapter. This segmentor runs them once
per image, then the K members batched: :class:`EnsembleEoMTDecoder` fans the tokens out to
``K * B`` member-stacked rows when the queries join, and every module holding member tensors is a
stacked module (:mod:`.stacked`), so EoMT's own block loop runs unchanged, with no loop over
members (only the upscaler's convolutions run member by member, on their rows of the stacked
batch, where that is faster than batching them). Cost per image: about
``1 + (K - 1) * (L2 / L + decoder share)`` of one model.

Configuration (``model = dict(type='AdapterEnsembleEoMT', ...)``, otherwise an ``AnomalyEoMT``):

* ``adapters``: adapter folders written by ``save_adapter`` (members for inference), and/or
* ``member_seeds``: one seed per member (members to train: each draws its LoRA ``A``
  initialisation, LoRA dropout, masked-attention and point-sampling randomness from its own
  stream, as a run of that member alone from ``torch.manual_seed(seed)`` would);
  :meth:`load_members` also takes names in another model's adapter bank.
* ``test_cfg.anomaly_scores``: names of :data:`.scores.ENSEMBLE_SCORE_NAMES` (the six
  single-model names = the mean-score ensemble; ``mutual_info``, ``rba_variance``);
  ``test_cfg.member_scores``: single-model names also written per member (``msp_m0``...).
* ``member_clip_grad``: gradient clipping per member (``dict(max_norm=..., norm_type=2)``), as a
  run of that member alone with ``optim_wrapper.clip_grad`` would clip.

Outputs: ``seg_logits`` / ``pred_sem_seg`` of the mean of the members' per-pixel class scores,
``anomaly_scores`` as configured. Training sums the members' losses (keys ``m{k}.loss_*``).
The members' random streams are part of the state dict (``_extra_state``, plain tensors), so a
checkpoint holds them and a resumed joint run continues exactly.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmseg.registry import MODELS
from mmseg.utils import SampleList
from torch import Tensor

from eomt_mm.lora.adapters import adapter_state_keys
from eomt_mm.lora.adapters.state import set_layer_scale_state
from eomt_mm.models.segmentors.structures import EoMTPredictions, InferenceOutputs
from eomt_mm.lora.layer import LoRALinear
from ..scores import SCORE_NAMES, check_score_names
from ..segmentor import AnomalyEoMT
from .members import (check_member_base, check_prefix_free, final_norm_modules,
                      initial_values, member_values, read_member, set_member, stack_members)
from .rng import MemberStreams
from .scores import check_ensemble_score_names, ensemble_anomaly_scores, member_score_name
from .stacked import StackedLoRALinear
from .training import clip_member_gradients, member_train_step

__all__ = ['AdapterEnsembleEoMT']

_CHECK_BASE = ('warn', 'error', 'ignore')


#: torch's state-dict key of a module's ``get_extra_state`` (here: the member streams).
_EXTRA_STATE_KEY = '_extra_state'


def _keep_member_values(module: 'AdapterEnsembleEoMT', state_dict: dict, prefix: str,
                        *args) -> None:
    """Load-state-dict pre-hook: single-model values of member tensors leave members as they are.

    A single model's checkpoint (the base an ensemble of adapter files runs on, or ``load_from``
    of a joint run) holds one value per member tensor; the members keep their own (adapters
    loaded, or their initialisation) instead of failing on the shape, and the shared tensors load.
    Without saved member streams the streams stay as they are (a strict load does not fail).
    """
    live = dict(module.state_dict(keep_vars=True))
    kept, stacked = [], []
    for key, shape in module.member_layout.items():
        value = state_dict.get(prefix + key)
        if value is not None and tuple(value.shape) == tuple(shape):
            state_dict[prefix + key] = live[key].detach()
            kept.append(key)
        elif value is not None:
            stacked.append(key)
    if kept:
        print_log(f'AdapterEnsembleEoMT: the checkpoint holds single-model values of {len(kept)} '
                  f'member tensors (e.g. {kept[0]}); each member keeps its own',
                  logger='current')
    if prefix + _EXTRA_STATE_KEY not in state_dict:
        if stacked:
            print_log('AdapterEnsembleEoMT: the checkpoint holds the members\' own tensors but '
                      f'not their random streams (no {_EXTRA_STATE_KEY!r} entry: written by a '
                      'version that did not save them); the members keep their current '
                      'streams, so a resumed run is not exact', logger='current',
                      level=logging.WARNING)
        state_dict[prefix + _EXTRA_STATE_KEY] = live[_EXTRA_STATE_KEY]


@MODELS.register_module()
class AdapterEnsembleEoMT(AnomalyEoMT):
    """K adapters of one frozen EoMT base, run together with a shared prefix.

    Args:
        backbone: Backbone config (the shared frozen base).
        decoder: ``EoMTDecoder`` config (built as :class:`EnsembleEoMTDecoder`).
        lora_config: The members' LoRA config (required; LoRA on the query blocks only).
        adapters: Adapter folders (``save_adapter``), one per member.
        member_seeds: One int seed per member (default ``0 .. K-1`` with ``adapters``).
        check_base: What to do when an adapter file's base fingerprints differ from the
            ensemble's base when it is read: ``'ignore'`` (default: at build time the base is
            its initialisation, the checkpoint is loaded afterwards), ``'warn'``, ``'error'``.
        member_clip_grad: Per-member gradient clipping, ``dict(max_norm, norm_type=2)``; then
            ``optim_wrapper.clip_grad`` must be unset (it would clip all members together).
        test_cfg: As :class:`AnomalyEoMT`, with ensemble score names and ``member_scores``.
        **kwargs: Other :class:`AnomalyEoMT` / :class:`EoMT` arguments.
    """

    def __init__(self, backbone: dict, decoder: dict, lora_config: Optional[dict] = None,
                 adapters: Optional[Sequence[str]] = None,
                 member_seeds: Optional[Sequence[int]] = None, check_base: str = 'ignore',
                 member_clip_grad: Optional[dict] = None, test_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        if lora_config is None:
            raise ValueError('AdapterEnsembleEoMT needs the members\' lora_config (LoRA on the '
                             "query blocks: layers={'last': L2})")
        adapters = [str(a) for a in (adapters or [])]
        seeds = list(member_seeds) if member_seeds is not None else list(range(len(adapters)))
        if not seeds:
            raise ValueError('AdapterEnsembleEoMT: give adapters (folders written by '
                             'save_adapter) or member_seeds (one per member to train)')
        if adapters and len(adapters) != len(seeds):
            raise ValueError(f'AdapterEnsembleEoMT: {len(adapters)} adapters but '
                             f'{len(seeds)} member_seeds; give one seed per adapter')
        if check_base not in _CHECK_BASE:
            raise ValueError(f'check_base must be one of {_CHECK_BASE}, got {check_base!r}')
        test_cfg = dict(test_cfg or dict(mode='whole'))
        names = test_cfg.get('anomaly_scores')
        names = check_ensemble_score_names(names) if names else []
        per_member = test_cfg.pop('member_scores', None) or []
        decoder = dict(decoder)
        if decoder.get('type', 'EoMTDecoder') not in ('EoMTDecoder', 'EnsembleEoMTDecoder'):
            raise ValueError(f"AdapterEnsembleEoMT needs decoder type 'EoMTDecoder', got "
                             f"{decoder.get('type')!r}")
        single_test_cfg = dict(test_cfg)
        single_names = [n for n in names if n in SCORE_NAMES]
        single_test_cfg.pop('anomaly_scores', None)
        if single_names:
            single_test_cfg['anomaly_scores'] = single_names
        #: Config of one member as a plain AnomalyEoMT (:meth:`member_model`).
        self.single_model_cfg = copy.deepcopy(dict(
            type='AnomalyEoMT', backbone=backbone, decoder=dict(decoder, type='EoMTDecoder'),
            lora_config=lora_config, test_cfg=single_test_cfg, **kwargs))
        super().__init__(backbone=backbone, decoder=dict(decoder, type='EnsembleEoMTDecoder'),
                         lora_config=lora_config, test_cfg=single_test_cfg, **kwargs)
        self.test_cfg = test_cfg
        self.num_members = len(seeds)
        #: Ensemble score names, and single-model names also written per member.
        self.ensemble_scores = names
        self.member_scores = check_score_names(per_member) if per_member else []
        if self.member_scores and not names:
            raise ValueError('test_cfg.member_scores needs test_cfg.anomaly_scores too')
        # Every field a prediction gets (what the inherited geometry code restores).
        self.anomaly_scores = names + [member_score_name(n, k) for k in range(self.num_members)
                                       for n in self.member_scores]
        if self.checkpoint_blocks > self.first_query_block:
            raise ValueError(f'AdapterEnsembleEoMT: checkpoint_blocks={self.checkpoint_blocks} '
                             f'reaches into the query blocks (from {self.first_query_block}); '
                             "use 'frozen' or at most the number of prefix blocks")
        self.member_clip_grad = None if member_clip_grad is None else dict(member_clip_grad)
        self.member_streams = MemberStreams(seeds)
        keys = list(adapter_state_keys(self))
        #: Backbone modules after the last block (found before stacking changes them).
        self.final_norm_names = final_norm_modules(self)
        check_prefix_free(self, keys, 'the lora_config of this AdapterEnsembleEoMT',
                          self.final_norm_names)
        live = dict(self.state_dict(keep_vars=True))
        #: key -> shape of one member's tensors.
        self.member_layout = {k: tuple(live[k].shape) for k in keys}
        scalings = [{n: float(m.scaling) for n, m in self.named_modules()
                     if isinstance(m, LoRALinear)} for _ in seeds]
        stack_members(self, initial_values(self, keys, self.member_streams), scalings,
                      self.member_streams)
        self.decoder.num_members = self.num_members
        self.decoder.member_streams = self.member_streams
        self.register_load_state_dict_pre_hook(_keep_member_values)
        if adapters:
            self.load_members(adapters, check_base=check_base)

    # ------------------------------------------------------------------ members
    def load_members(self, sources: Sequence[str], bank_model: Optional[torch.nn.Module] = None,
                     check_base: str = 'warn') -> None:
        """Make the members the given adapters.

        Args:
            sources: One per member: an adapter folder, or a name in ``bank_model``'s bank.
            bank_model: A single model (same base and lora_config) with named adapters.
            check_base: Base fingerprint check of adapter files (``'warn'``, ``'error'``,
                ``'ignore'``); load the base checkpoint first for it to mean anything.
        """
        sources = list(sources)
        if len(sources) != self.num_members:
            raise ValueError(f'load_members: {len(sources)} adapters for an ensemble of '
                             f'{self.num_members} members')
        read = [read_member(s, self.member_layout, self, bank_model) for s in sources]
        for source, (_, _, config) in zip(sources, read):
            check_member_base(self, config, check_base, repr(source))
        for k, (tensors, scalings, _) in enumerate(read):
            set_member(self, k, tensors, scalings)

    def get_extra_state(self) -> dict:
        """The members' random streams, saved in the state dict (hence in checkpoints).

        Plain tensors only (:meth:`MemberStreams.state_dict`), so weights-only loading reads
        them; a resumed joint run continues every member's LoRA-dropout, masked-attention and
        point-sampling draws where the saved run stopped.
        """
        return {'member_streams': self.member_streams.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Continue from saved member streams (:meth:`get_extra_state`).

        Streams saved with other seeds are not restored (a warning says so): they belong to
        other members, and these members draw from their own seeds' streams.

        Args:
            state: What :meth:`get_extra_state` returned when the checkpoint was written.
        """
        if not isinstance(state, Mapping) or 'member_streams' not in state:
            raise ValueError('AdapterEnsembleEoMT: the state dict entry '
                             f'{_EXTRA_STATE_KEY!r} must be a dict with "member_streams" '
                             f'(written by get_extra_state), got {type(state).__name__}')
        if not self.member_streams.load_state_dict(state['member_streams']):
            saved = state['member_streams']['seeds'].tolist()
            print_log(f'AdapterEnsembleEoMT: the checkpoint\'s member random streams have seeds '
                      f'{saved}, this ensemble\'s member_seeds are {self.member_streams.seeds}; '
                      'the streams are not restored (each member draws from its own seed)',
                      logger='current', level=logging.WARNING)

    def member_state(self, index: int) -> Dict[str, Tensor]:
        """Member ``index``'s tensors with the keys and shapes of a single model's adapter."""
        return member_values(self, index, list(self.member_layout))

    def member_model(self, index: int) -> AnomalyEoMT:
        """Member ``index`` alone: a plain ``AnomalyEoMT`` with the shared base and its adapter.

        ``save_adapter(ensemble.member_model(k), folder)`` writes an ordinary adapter file.
        """
        single = MODELS.build(copy.deepcopy(self.single_model_cfg))
        own = self.member_state(index)
        state = {k: (own[k] if k in own else v) for k, v in self.state_dict().items()
                 if k != _EXTRA_STATE_KEY}
        single.load_state_dict(state, strict=True)
        modules = dict(single.named_modules())
        for name, layer in self.named_modules():
            if isinstance(layer, StackedLoRALinear):
                target = modules[name]
                scaling = layer.scalings[index]
                set_layer_scale_state(target, (target.alpha, target.use_rslora, scaling))
        return single.to(next(self.parameters()).device).train(self.training)

    def split_members(self, tensor: Tensor) -> Tensor:
        """``[K * B, ...]`` member-stacked rows -> ``[K, B, ...]``."""
        return tensor.reshape(self.num_members, tensor.shape[0] // self.num_members,
                              *tensor.shape[1:])

    # ------------------------------------------------------------------ network
    def loss(self, inputs: Tensor, data_samples: SampleList) -> dict:
        """Sum of the members' losses on one shared-prefix pass.

        :meth:`EoMT.run_network` runs once on member-stacked rows ``[K * B]`` (member-major);
        each member's slice of its predictions goes to the single-model
        :meth:`AnomalyEoMT.loss_from_predictions` inside that member's random stream (point
        sampling), so it equals the loss of that member trained alone.

        Args:
            inputs: Normalised images ``[B, C, H, W]``.
            data_samples: Samples with ``gt_sem_seg``.

        Returns:
            The members' loss dicts, keys prefixed ``m{k}.``.
        """
        predictions = self.run_network(inputs, masked_attn=self._masked_attn())
        losses = {}
        for k in range(self.num_members):
            member_predictions = EoMTPredictions(
                [self.split_members(m)[k] for m in predictions.mask_logits],
                [self.split_members(c)[k] for c in predictions.class_logits])
            with self.member_streams.member(k, inputs.device):
                member = self.loss_from_predictions(member_predictions, data_samples)
            losses.update({f'm{k}.{key}': value for key, value in member.items()})
        return losses

    def train_step(self, data, optim_wrapper) -> Dict[str, Tensor]:
        """mmengine's train step, with :attr:`member_clip_grad` applied member by member."""
        if self.member_clip_grad is None:
            return super().train_step(data, optim_wrapper)
        return member_train_step(self, data, optim_wrapper)

    def clip_member_gradients(self) -> List[float]:
        """Clip each member's gradients by its own norm (:attr:`member_clip_grad`)."""
        return clip_member_gradients(self, self.num_members, **self.member_clip_grad)

    # ---------------------------------------------------------------- inference
    def _infer(self, inputs: Tensor) -> InferenceOutputs:
        """Mean of the members' class scores; members' queries side by side (``K * Q``).

        The mask and class logits of image ``i`` hold member ``k``'s queries at
        ``k * Q .. (k + 1) * Q - 1``, so the single-model geometry code restores them per image
        (whole and slide mode) and :meth:`_score` splits them again.
        """
        mask_logits, class_logits = self.forward_logits(inputs)
        masks, classes = self.split_members(mask_logits), self.split_members(class_logits)
        seg_logits = None
        for k in range(self.num_members):
            upsampled = F.interpolate(masks[k], size=inputs.shape[-2:], mode='bilinear',
                                      align_corners=False)
            member = self.decoder.semantic_map(classes[k], upsampled)
            seg_logits = member if seg_logits is None else seg_logits + member
            del upsampled
        seg_logits = seg_logits / self.num_members
        side_by_side = masks.transpose(0, 1).flatten(1, 2)
        return InferenceOutputs(seg_logits, side_by_side,
                                classes.transpose(0, 1).flatten(1, 2))

    def _score(self, class_logits: Tensor, mask_logits: Tensor) -> Dict[str, Tensor]:
        """``[1, H, W]`` float32 map per configured ensemble (and member) score."""
        batch, queries = mask_logits.shape[:2]
        per_member = queries // self.num_members
        classes = class_logits.float().reshape(batch, self.num_members, per_member, -1)
        masks = mask_logits.float().reshape(batch, self.num_members, per_member,
                                            *mask_logits.shape[-2:])
        scores = ensemble_anomaly_scores(classes.transpose(0, 1), masks.transpose(0, 1),
                                         self.ensemble_scores, self.member_scores)
        return {name: value[0:1] for name, value in scores.items()}
