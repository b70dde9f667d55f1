"""Per-member random streams: each ensemble member draws as if it were trained alone.

A member trained alone draws its LoRA-dropout masks, masked-attention draws and the point
sampling of its set loss from torch's default generator, in a fixed order. In a joint run the K
members share one forward pass, so their draws would interleave in one stream. Here each member
owns a generator state (seeded by its own seed); :meth:`MemberStreams.member` swaps it in as the
default generator of a device for the duration of that member's draws and keeps what it consumed,
like ``torch.random.fork_rng`` with a state that persists between calls. A member therefore
sees the same sequence of draws as a run of that member alone started from
``torch.manual_seed(seed)``.

The streams go into checkpoints as plain tensors (:meth:`MemberStreams.state_dict`), so that a
resumed joint run continues every member's draws where they stopped, and a weights-only loader
reads them back.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import torch

__all__ = ['MemberStreams']


def _device_key(device: torch.device) -> Tuple[str, int]:
    device = torch.device(device)
    if device.type == 'cpu':
        return 'cpu', -1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return device.type, index


def _device_name(key: Tuple[str, int]) -> str:
    return 'cpu' if key[0] == 'cpu' else f'{key[0]}:{key[1]}'


class MemberStreams:
    """One random stream per ensemble member, per device.

    Args:
        seeds: One integer seed per member.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        seeds = list(seeds)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f'member seeds must be a non-empty list of ints, got {seeds!r}')
        self.seeds: List[int] = seeds
        self._states: Dict[Tuple[str, int], List[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def _states_of(self, key: Tuple[str, int]) -> List[torch.Tensor]:
        if key not in self._states:
            device = _device_name(key)
            self._states[key] = [torch.Generator(device=device).manual_seed(s).get_state()
                                 for s in self.seeds]
        return self._states[key]

    @contextlib.contextmanager
    def member(self, index: int, device: torch.device = torch.device('cpu')) -> Iterator[None]:
        """Make member ``index``'s stream the default generator of ``device`` inside the block.

        Args:
            index: Member index in ``[0, K)``.
            device: Device whose default generator is swapped (CPU or a CUDA device).
        """
        if not 0 <= index < len(self.seeds):
            raise IndexError(f'member index {index} out of range for {len(self.seeds)} members')
        key = _device_key(device)
        states = self._states_of(key)
        if key[0] == 'cpu':
            get_state, set_state = torch.get_rng_state, torch.set_rng_state
        elif key[0] == 'cuda':
            def get_state():
                return torch.cuda.get_rng_state(key[1])

            def set_state(state):
                torch.cuda.set_rng_state(state, key[1])
        else:
            raise ValueError(f'member random streams support CPU and CUDA, not {key[0]!r}')
        outer = get_state()
        set_state(states[index])
        try:
            yield
        finally:
            states[index] = get_state()
            set_state(outer)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The streams as plain tensors (what a weights-only checkpoint loader accepts).

        Returns:
            ``seeds``: ``[K]`` int64; per device whose streams were used (``'cpu'``,
            ``'cuda:0'``...): ``[K, S]`` uint8 generator states, row ``k`` = member ``k``.
        """
        state = {'seeds': torch.tensor(self.seeds, dtype=torch.int64)}
        for key, states in self._states.items():
            state[_device_name(key)] = torch.stack(states)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Continue from saved streams (:meth:`state_dict`) when they are of the same seeds.

        Args:
            state: A :meth:`state_dict`.

        Returns:
            True when restored; False when the saved seeds differ from :attr:`seeds` (then the
            streams stay as they are: those are other members' streams).

        Raises:
            ValueError: ``state`` is not a :meth:`state_dict` of member streams.
        """
        seeds = state.get('seeds') if isinstance(state, Mapping) else None
        if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1:
            raise ValueError('saved member streams need a 1-D int tensor "seeds" (written by '
                             f'MemberStreams.state_dict), got {type(state).__name__} {state!r:.80}')
        if seeds.tolist() != self.seeds:
            return False
        restored = {}
        for name, states in state.items():
            if name == 'seeds':
                continue
            if (not isinstance(states, torch.Tensor) or states.dtype != torch.uint8
                    or states.dim() != 2 or states.shape[0] != len(self.seeds)):
                raise ValueError(f'saved member streams of device {name!r} must be a uint8 '
                                 f'[{len(self.seeds)}, S] tensor of generator states, got '
                                 f'{getattr(states, "dtype", type(states).__name__)} '
                                 f'{list(getattr(states, "shape", []))}')
            try:
                key = _device_key(torch.device(name))
            except RuntimeError as error:
                raise ValueError(f'saved member streams: {name!r} is not a device name') from error
            restored[key] = [row.clone() for row in states]
        self._states.update(restored)
        return True
