"""Per-member random streams: each ensemble member draws as if it were trained alone.

A member trained alone draws its LoRA-dropout masks, masked-attention draws and the point
sampling of its set loss from torch's default generator, in a fixed order. In a joint run the K
members share one forward pass, so their draws would interleave in one stream. Here each member
owns a generator state (seeded by its own seed); :meth:`MemberStreams.member` swaps it in as the
default generator of a device for the duration of that member's draws and keeps what it consumed,
like ``torch.random.fork_rng`` with a state that persists between calls. A member therefore
sees the same sequence of draws as a run of that member alone started from
``torch.manual_seed(seed)``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

__all__ = ['MemberStreams']


def _device_key(device: torch.device) -> Tuple[str, int]:
    device = torch.device(device)
    if device.type == 'cpu':
        return 'cpu', -1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return device.type, index


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
            device = 'cpu' if key[0] == 'cpu' else f'{key[0]}:{key[1]}'
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
