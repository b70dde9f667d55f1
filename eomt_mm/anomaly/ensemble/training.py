"""Joint training of K ensemble members: the train step, per-member clipping, saving members.

The members share no trainable tensor (the base is frozen; every member tensor is stacked with a
leading K axis), so the gradient of the summed loss with respect to member ``k``'s slice is the
gradient of member ``k``'s own loss, and an element-wise optimizer (SGD, Adam, AdamW) updates each
slice as it would update that member alone. Only gradient clipping couples members, because
``torch.nn.utils.clip_grad_norm_`` uses the norm of everything it is given; hence
:func:`clip_member_gradients`, which uses each member's own norm with torch's formula.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, Dict, List, Optional

import torch
from mmengine.hooks import Hook
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import HOOKS
from torch import Tensor, nn

from eomt_mm.lora.adapters import save_adapter
from eomt_mm.utils.model import unwrap_model

__all__ = ['clip_member_gradients', 'member_train_step', 'save_member_adapters',
           'SaveMemberAdaptersHook']


def clip_member_gradients(model: nn.Module, num_members: int, max_norm: float,
                          norm_type: float = 2.0) -> List[float]:
    """Clip each member's gradients by that member's total norm, in place.

    Same formula as ``torch.nn.utils.clip_grad_norm_`` (``coef = max_norm / (norm + 1e-6)``,
    applied when below 1), computed per member over the ``[k]`` slices of every trainable
    parameter.

    Args:
        model: The ensemble; every trainable parameter must be member-stacked ``[K, ...]``.
        num_members: K.
        max_norm: Largest allowed norm of one member's gradients.
        norm_type: p of the p-norm.

    Returns:
        Each member's norm before clipping.
    """
    grads = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() == 0 or param.shape[0] != num_members:
            raise ValueError(f'{name} trains but is not member-stacked (leading axis '
                             f'{num_members}); an adapter ensemble trains member tensors only')
        if param.grad is not None:
            grads.append(param.grad)
    norms = []
    for k in range(num_members):
        parts = [torch.linalg.vector_norm(g[k], norm_type) for g in grads]
        total = (torch.linalg.vector_norm(torch.stack(parts), norm_type) if parts
                 else torch.zeros(()))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g[k].mul_(coef.to(g.dtype))
        norms.append(float(total))
    return norms


def member_train_step(model: nn.Module, data: Any,
                      optim_wrapper: OptimWrapper) -> Dict[str, Tensor]:
    """``BaseModel.train_step`` with per-member clipping between backward and step.

    Args:
        model: The ensemble (``member_clip_grad`` set).
        data: A batch from the dataloader.
        optim_wrapper: A plain ``OptimWrapper`` without ``clip_grad``.

    Returns:
        The log variables (also ``m{k}.grad_norm``).
    """
    if isinstance(optim_wrapper, AmpOptimWrapper):
        raise ValueError('member_clip_grad clips unscaled gradients; it does not support '
                         'AmpOptimWrapper (use OptimWrapper, or clip with optim_wrapper.clip_grad '
                         'over all members together)')
    if optim_wrapper.clip_grad_kwargs:
        raise ValueError('AdapterEnsembleEoMT.member_clip_grad is set: remove '
                         'optim_wrapper.clip_grad, which would clip all members together')
    with optim_wrapper.optim_context(model):
        data = model.data_preprocessor(data, True)
        losses = model._run_forward(data, mode='loss')
    parsed, log_vars = model.parse_losses(losses)
    optim_wrapper.backward(optim_wrapper.scale_loss(parsed))
    if optim_wrapper.should_update():
        for k, norm in enumerate(model.clip_member_gradients()):
            log_vars[f'm{k}.grad_norm'] = torch.tensor(norm)
        optim_wrapper.step()
        optim_wrapper.zero_grad()
    return log_vars


def save_member_adapters(model: nn.Module, out_dir: str,
                         metadata: Optional[Dict[str, Any]] = None) -> List[str]:
    """Save every member as an ordinary adapter folder ``out_dir/member_{k}``.

    Args:
        model: The ensemble (wrappers are unwrapped).
        out_dir: Parent folder.
        metadata: Extra JSON-able metadata stored in each adapter (plus member and seed).

    Returns:
        The folders written.
    """
    model = unwrap_model(model)
    folders = []
    for k in range(model.num_members):
        folder = osp.join(out_dir, f'member_{k}')
        info = dict(metadata or {}, ensemble_member=k, member_seed=model.member_streams.seeds[k])
        single = model.member_model(k)
        save_adapter(single, folder, metadata=info)
        del single
        folders.append(folder)
    return folders


@HOOKS.register_module()
class SaveMemberAdaptersHook(Hook):
    """After training, save each ensemble member as an adapter (``{work_dir}/members/``).

    Args:
        out_dir: Folder of the member folders (default: ``{work_dir}/members``).
    """

    priority = 'LOW'

    def __init__(self, out_dir: Optional[str] = None) -> None:
        self.out_dir = out_dir

    def after_train(self, runner) -> None:
        """Write ``member_{k}`` folders and log where they are."""
        out_dir = self.out_dir or osp.join(runner.work_dir, 'members')
        os.makedirs(out_dir, exist_ok=True)
        folders = save_member_adapters(runner.model, out_dir,
                                       metadata=dict(iteration=runner.iter))
        runner.logger.info(f'ensemble members saved as adapters: {", ".join(folders)}')
