"""Timed, guarded parts within one total time budget, and the settings they share.

Each part is a function ``fn(settings, record, shared)`` that records checks, figures and notes
on a :class:`Record`. A part that raises is reported with the end of its traceback and the other
parts still run; a part that would start with less budget left than its estimate is skipped; a
part still running when the budget is spent is interrupted (``SIGALRM``) and reported as timed
out. The caller writes the results after every part, so a run killed from outside keeps what it
had measured.
"""
from __future__ import annotations

import dataclasses
import signal
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Part statuses. 'not_applicable' is a part that cannot run on this device by design (fp16 with
# GradScaler on a CPU) and does not make the run fail; every other status but 'passed' does.
PASSED, FAILED, ERROR, TIMEOUT, SKIPPED, NOT_APPLICABLE = (
    'passed', 'failed', 'error', 'timeout', 'skipped', 'not_applicable')


@dataclasses.dataclass
class Settings:
    """What every part needs to know about the run.

    Args:
        device: ``'cuda'`` or ``'cpu'`` (``--dry-run``).
        dry_run: Tiny models and sizes on the CPU, exercising the same code paths.
        size: Training and inference image side (multiple of the patch size 16).
        batch: Training batch.
        steps: Training steps per run (loss checked over all of them).
        warmup: Leading training steps left out of the step time.
        infer_batch: Images per inference call.
        infer_repeats: Timing rounds over the inference variants.
        infer_steps: Timed calls per variant and round.
        compile_backend: ``torch.compile`` backend (``'inductor'`` on a GPU).
        amp_iters: Iterations of the ``tools/train.py --amp`` runs.
        amp_dtypes: ``--amp`` values run through ``tools/train.py``.
        lr: Learning rate replacing the configs' (None = the configs' own).
        seed: Seed of weights, batches and labels.
        backbone_arch: Backbone ``arch`` replacing ViT-B (dry run), None = the configs'.
        decoder_overrides: Decoder settings replacing the configs' (dry run: fewer queries and
            sampled points).
        work_dir: Folder for converted weights, demo data and the training tool's runs.
    """

    device: str
    dry_run: bool
    size: int
    batch: int
    steps: int
    warmup: int
    infer_batch: int
    infer_repeats: int
    infer_steps: int
    compile_backend: str
    amp_iters: int
    amp_dtypes: Tuple[str, ...]
    lr: Optional[float]
    seed: int
    backbone_arch: Optional[dict]
    decoder_overrides: dict
    work_dir: str


class NotApplicable(Exception):
    """Raised by a part that cannot run on this device by design (the reason is reported)."""


class PartTimeout(BaseException):
    """Raised inside a part when the run's budget is spent (a BaseException, so that the
    ``except Exception`` of library code cannot swallow it)."""


@dataclasses.dataclass
class Record:
    """What one part reports."""

    name: str
    status: str = ERROR
    seconds: float = 0.0
    checks: List[dict] = dataclasses.field(default_factory=list)
    metrics: Dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    def check(self, name: str, ok: bool, detail: str = '') -> bool:
        """Record one check (it never raises: the part goes on to its next check).

        Args:
            name: What is checked.
            ok: Whether it holds.
            detail: The numbers behind the verdict.

        Returns:
            ``ok``.
        """
        self.checks.append(dict(name=name, ok=bool(ok), detail=detail))
        return bool(ok)

    def note(self, text: str) -> None:
        """Record a remark that is not a check (what was skipped and why, versions)."""
        self.notes.append(text)


@dataclasses.dataclass
class Part:
    """One part of the check.

    Args:
        name: Identifier (``--parts`` takes these).
        fn: ``fn(settings, record, shared)``; ``shared`` carries results between parts.
        estimate_s: Seconds it needs on a GPU (a part starts only with that much budget left).
        estimate_dry_s: The same for the CPU dry run.
        title: One line for the table.
    """

    name: str
    fn: Callable[[Settings, Record, dict], None]
    estimate_s: float
    estimate_dry_s: float
    title: str


def _on_alarm(signum, frame):  # noqa: ARG001  (signal handler signature)
    raise PartTimeout()


def run_part(part: Part, settings: Settings, shared: dict, seconds_left: float) -> Record:
    """Run one part, timed and guarded.

    Args:
        part: The part.
        settings: The run's settings.
        shared: Results the parts hand on to each other.
        seconds_left: Budget left; the part is interrupted when it is spent.

    Returns:
        Its :class:`Record`, with the status settled.
    """
    record = Record(part.name)
    estimate = part.estimate_dry_s if settings.dry_run else part.estimate_s
    if seconds_left < estimate:
        record.status = SKIPPED
        record.note(f'skipped: {seconds_left:.0f} s of the budget left, the part needs about '
                    f'{estimate:.0f} s (raise --budget or run fewer --parts)')
        return record
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds_left, 1e-3))
    try:
        part.fn(settings, record, shared)
    except NotApplicable as exc:
        record.status = NOT_APPLICABLE
        record.note(str(exc))
    except PartTimeout:
        record.status = TIMEOUT
        record.error = f'interrupted after {time.perf_counter() - start:.0f} s: budget spent'
    except Exception:  # noqa: BLE001  (a failing part is reported; the others still run)
        record.status = ERROR
        record.error = ''.join(traceback.format_exc().splitlines(True)[-25:])
    else:
        failed = [c for c in record.checks if not c['ok']]
        if not record.checks:
            record.status = FAILED
            record.error = 'the part recorded no check'
        else:
            record.status = FAILED if failed else PASSED
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        record.seconds = time.perf_counter() - start
    return record


def run_parts(parts: Sequence[Part], settings: Settings, budget_s: float,
              after_each: Optional[Callable[[List[Record]], None]] = None) -> List[Record]:
    """Run ``parts`` in order within ``budget_s`` seconds.

    Args:
        parts: The parts, most important first (later ones are skipped when time runs out).
        settings: The run's settings.
        budget_s: Total seconds for all parts.
        after_each: Called with the records so far after every part (writes the report).

    Returns:
        One record per part.
    """
    shared: dict = {}
    records: List[Record] = []
    start = time.perf_counter()
    for part in parts:
        left = budget_s - (time.perf_counter() - start)
        records.append(run_part(part, settings, shared, left))
        if after_each is not None:
            after_each(records)
    return records


def exit_code(records: Sequence[Record]) -> int:
    """0: every part passed (or cannot run here by design); 1: a check failed, a part raised or
    timed out; 2: nothing failed but some part was skipped for lack of budget."""
    statuses = {r.status for r in records}
    if statuses & {FAILED, ERROR, TIMEOUT}:
        return 1
    if SKIPPED in statuses:
        return 2
    return 0
