"""Running and killing the soak's training processes (tests/robustness/soak.py).

A :class:`TrainProcess` is one ``tools/train.py`` process in its own process group, its log read
line by line; :func:`run_training` trains to the end, killing and resuming as planned and
scanning the work dir after each kill; :func:`classify_kill` says where a kill landed.
"""
from __future__ import annotations

import dataclasses
import os
import os.path as osp
import queue
import re
import signal
import statistics
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from soak_checks import CKPT_NAME_RE, TEMP_RE, ScanReport, resume_point, scan_work_dir
from soak_plan import REPO, PlannedKill, SoakSettings, child_env, train_command

__all__ = ['PHASE_STARTUP', 'PHASE_STEP', 'PHASE_SAVE_BEFORE_WRITE', 'PHASE_SAVE_MID_WRITE',
           'PHASE_SAVE_BEFORE_POINTER', 'PHASE_SAVE_POINTER_EMPTY', 'PHASE_AFTER_SAVE',
           'SAVE_PHASES', 'TrainProcess', 'Attempt', 'classify_kill', 'run_training']

# mmengine's log lines (LoggerHook with interval 1, CheckpointHook, Runner.resume) are the only
# window into the child; they are flushed line by line with PYTHONUNBUFFERED.
_ITER_RE = re.compile(r'Iter\(train\) \[\s*(\d+)/(\d+)\]')
_SAVE_RE = re.compile(r'Saving checkpoint at (\d+) iterations')
_RESUMED_RE = re.compile(r'resumed epoch: \d+, iter: (\d+)')

# Phases a kill can land in, from what the child printed last and what is on disk afterwards.
PHASE_STARTUP = 'start-up / resume'
PHASE_STEP = 'training step'
PHASE_SAVE_BEFORE_WRITE = 'save: serialising (nothing written)'
PHASE_SAVE_MID_WRITE = 'save: writing (temp file left)'
PHASE_SAVE_BEFORE_POINTER = 'save: renamed, last_checkpoint not updated'
PHASE_SAVE_POINTER_EMPTY = 'save: writing last_checkpoint (left empty)'
PHASE_AFTER_SAVE = 'right after a save'
SAVE_PHASES = (PHASE_SAVE_BEFORE_WRITE, PHASE_SAVE_MID_WRITE, PHASE_SAVE_BEFORE_POINTER,
               PHASE_SAVE_POINTER_EMPTY)


class TrainProcess:
    """One ``tools/train.py`` process in its own process group, its log read line by line.

    Args:
        cmd: Command line.
        env: Environment.
        log_path: File that receives the child's stdout and stderr.
        work_dir: The run's work dir (stat'ed when a save is announced).
        watch_saves: Time every save on disk (see :attr:`save_windows`).
    """

    def __init__(self, cmd: Sequence[str], env: Dict[str, str], log_path: str,
                 work_dir: str, watch_saves: bool = False) -> None:
        self.work_dir = work_dir
        self.watch_saves = watch_saves
        self.started = time.monotonic()
        self.events: 'queue.Queue[tuple]' = queue.Queue()
        self.tail: List[str] = []
        #: Per watched save, seconds from its log line to the atomic writer's temporary
        #: file appearing, to the checkpoint being renamed into place and to
        #: ``last_checkpoint`` naming it.
        self.save_windows: List[Tuple[float, float, float]] = []
        self._watchers: List[threading.Thread] = []
        self._log = open(log_path, 'w')
        # A new session makes the child the leader of its own process group, so one killpg
        # reaches it and anything it spawned, and nothing of ours.
        self.proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                     cwd=REPO, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            self._log.write(line)
            self.tail = (self.tail + [line])[-40:]
            m = _ITER_RE.search(line)
            if m:
                self.events.put(('iter', now, int(m.group(1))))
                continue
            m = _SAVE_RE.search(line)
            if m:
                step = int(m.group(1))
                # Identity of the file this save will replace (if any), to tell afterwards
                # whether the save reached the rename.
                try:
                    st = os.stat(osp.join(self.work_dir, f'iter_{step}.pth'))
                    before = (st.st_ino, st.st_mtime_ns)
                except FileNotFoundError:
                    before = None
                self.events.put(('save', now, step, before))
                if self.watch_saves:
                    watcher = threading.Thread(target=self._watch_save,
                                               args=(step, now, before), daemon=True)
                    watcher.start()
                    self._watchers.append(watcher)
                continue
            m = _RESUMED_RE.search(line)
            if m:
                self.events.put(('resumed', now, int(m.group(1))))
        self._log.flush()
        self.events.put(('eof', time.monotonic()))

    def _watch_save(self, step: int, announced: float, before: Optional[tuple]) -> None:
        """Poll the work dir every millisecond until the announced save has finished.

        The log says when a save starts but not when its bytes hit the disk or when
        ``last_checkpoint`` names the new file; kills meant for those stages need their
        timing, measured here on the reference run. Appends ``(temporary file created,
        renamed into place, last_checkpoint updated)`` in seconds after the announcement.
        """
        name = f'iter_{step}.pth'
        target = osp.join(self.work_dir, name)
        pointer = osp.join(self.work_dir, 'last_checkpoint')
        prefix = f'.{name}.{self.proc.pid}.'
        start = end = None
        while time.monotonic() < announced + 30 and self.proc.poll() is None:
            try:
                if end is None:
                    names = os.listdir(self.work_dir)
                    now = time.monotonic() - announced
                    if start is None and any(n.startswith(prefix) for n in names):
                        start = now
                    if name in names:
                        st = os.stat(target)
                        if (st.st_ino, st.st_mtime_ns) != before:
                            end = now
                if end is not None:
                    with open(pointer) as f:
                        named = f.read().strip()
                    if osp.basename(named) == name:
                        now = time.monotonic() - announced
                        self.save_windows.append((end if start is None else start, end, now))
                        return
            except FileNotFoundError:  # a file went between listdir and stat: poll again
                pass
            time.sleep(0.001)

    def kill(self) -> bool:
        """SIGKILL the process group; False when the child had already exited."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def finish(self) -> int:
        """Wait for the child and its log reader; returns the exit status."""
        code = self.proc.wait()
        self._reader.join()
        for watcher in self._watchers:
            watcher.join()
        self._log.close()
        return code


@dataclasses.dataclass
class Attempt:
    """One process of a run.

    Args:
        index: 0 for the first start, then one per restart.
        resumed_from: Iteration the process resumed at (0 for a fresh start).
        last_iter: Last iteration it logged.
        exit_code: Its exit status (-9 when killed).
        saves: Checkpoint saves it announced.
        iter_times: Seconds between consecutive iteration log lines (saves excluded).
        save_windows: Per watched save, seconds from its announcement to the start and the
            end of its write and to the update of ``last_checkpoint``.
        first_iter_s: Seconds from start to its first iteration log line.
    """

    index: int
    resumed_from: int = 0
    last_iter: int = 0
    exit_code: Optional[int] = None
    saves: List[int] = dataclasses.field(default_factory=list)
    iter_times: List[float] = dataclasses.field(default_factory=list)
    save_windows: List[Tuple[float, float, float]] = dataclasses.field(default_factory=list)
    first_iter_s: Optional[float] = None


def classify_kill(last_event: Optional[tuple], scan: ScanReport, pid: int, work_dir: str) -> str:
    """Where a kill landed, from the child's last log line and the files it left."""
    for temp in scan.temp_files:
        m = TEMP_RE.match(temp)
        if int(m.group('pid')) == pid and CKPT_NAME_RE.match(m.group('target')):
            return PHASE_SAVE_MID_WRITE
    if last_event is None or last_event[0] == 'resumed':
        return PHASE_STARTUP
    if last_event[0] != 'save':
        return PHASE_STEP
    _, _, step, before = last_event
    name = f'iter_{step}.pth'
    try:
        st = os.stat(osp.join(work_dir, name))
        after = (st.st_ino, st.st_mtime_ns)
    except FileNotFoundError:
        after = None
    if after is None or after == before:
        return PHASE_SAVE_BEFORE_WRITE
    if scan.last_checkpoint == '':
        return PHASE_SAVE_POINTER_EMPTY
    if osp.basename(scan.last_checkpoint or '') != name:
        return PHASE_SAVE_BEFORE_POINTER
    return PHASE_AFTER_SAVE


def run_training(work_dir: str, options: Sequence[str], settings: SoakSettings,
                 plan: Sequence[PlannedKill], deadline: float, log_dir: str,
                 say=print, watch_saves: bool = False) -> Dict[str, Any]:
    """Train to the end, killing and resuming as planned; scan the work dir after each kill.

    Args:
        work_dir: The run's work dir (must not hold a previous run).
        options: ``--cfg-options`` of every start.
        settings: The run's settings (for the budget estimate).
        plan: Kills in firing order (empty for the reference run).
        deadline: ``time.monotonic()`` by which the run must have finished; kills that would
            push the finish past it are skipped, and a child still running then is stopped.
        log_dir: Where each process's output goes (``attempt_<i>.log``).
        say: Progress printer.
        watch_saves: Time each save's write on disk (``attempts[i]['save_windows']``).

    Returns:
        ``attempts``, ``kills`` (one record per delivered kill), ``skipped_kills``,
        ``problems`` (found by the scans after each kill and at the end), ``finished``,
        ``failure``, ``final_checkpoint`` and ``temp_files`` (left at the end).
    """
    env = child_env(settings.threads)
    attempts: List[Attempt] = []
    kills: List[Dict[str, Any]] = []
    problems: List[str] = []
    pending = list(plan)
    skipped = 0
    failure = None
    finished = False
    while True:
        attempt = Attempt(index=len(attempts))
        attempts.append(attempt)
        child = TrainProcess(train_command(work_dir, options, resume=attempt.index > 0), env,
                             osp.join(log_dir, f'attempt_{attempt.index}.log'), work_dir,
                             watch_saves)
        fire_at = None
        last_event = None
        prev_iter_t = None
        killed = False
        while True:
            timeout = 0.2 if fire_at is None else max(0.0, fire_at - time.monotonic())
            try:
                ev = child.events.get(timeout=min(timeout, 0.2))
            except queue.Empty:
                ev = None
            if ev is not None and ev[0] == 'eof':
                break
            if ev is not None:
                last_event = ev
                if ev[0] == 'iter':
                    attempt.last_iter = ev[2]
                    if prev_iter_t is not None:
                        attempt.iter_times.append(ev[1] - prev_iter_t)
                    if attempt.first_iter_s is None:
                        attempt.first_iter_s = ev[1] - child.started
                    prev_iter_t = ev[1]
                elif ev[0] == 'save':
                    attempt.saves.append(ev[2])
                    prev_iter_t = None  # the save is not part of the next iteration's time
                elif ev[0] == 'resumed':
                    attempt.resumed_from = ev[2]
                if fire_at is None and pending:
                    nxt = pending[0]
                    if ((nxt.kind == 'step' and ev[0] == 'iter' and ev[2] >= nxt.anchor)
                            or (nxt.kind == 'save' and ev[0] == 'save' and ev[2] >= nxt.anchor)):
                        fire_at = ev[1] + nxt.delay_s
            now = time.monotonic()
            if fire_at is not None and now >= fire_at:
                nxt = pending.pop(0)
                # Budget: a restart costs a start-up plus the iterations since the last
                # checkpoint; if that could overrun the deadline, stop killing.
                times = [t for a in attempts for t in a.iter_times]
                est_iter = statistics.median(times) if times else 1.0
                est_start = max([a.first_iter_s for a in attempts if a.first_iter_s] or [30.0])
                left = settings.iters - attempt.last_iter + settings.ckpt_interval
                if now + 1.5 * (est_start + left * est_iter) > deadline:
                    skipped += 1 + len(pending)
                    pending.clear()
                    say(f'  budget: {skipped} kill(s) skipped so the run ends in time')
                elif child.kill():
                    killed = True
                    kills.append(dict(kind=nxt.kind, anchor=nxt.anchor, delay_s=nxt.delay_s,
                                      attempt=attempt.index))
                    break
                fire_at = None
            if now > deadline:
                child.kill()
                failure = 'the run did not finish within the time budget (--minutes)'
                break
        attempt.exit_code = child.finish()
        attempt.save_windows = list(child.save_windows)
        # Events the child printed before it died but the loop had not read yet.
        while True:
            try:
                ev = child.events.get_nowait()
            except queue.Empty:
                break
            if ev[0] == 'iter':
                attempt.last_iter = ev[2]
            elif ev[0] == 'save':
                attempt.saves.append(ev[2])
            elif ev[0] == 'resumed':
                attempt.resumed_from = ev[2]
            if ev[0] != 'eof':
                last_event = ev
        if failure:
            break
        if killed and attempt.exit_code == -signal.SIGKILL:
            scan = scan_work_dir(work_dir)
            record = kills[-1]
            record.update(
                last_logged_iter=attempt.last_iter,
                phase=classify_kill(last_event, scan, child.pid, work_dir),
                temp_files=len(scan.temp_files), resume_point=scan.last_checkpoint,
                problems=scan.problems)
            say(f"  kill {len(kills)} ({record['kind']} @ {record['anchor']}): after logged "
                f"iteration {attempt.last_iter}, {record['phase']}; resume from "
                f"{resume_point(scan.last_checkpoint)}"
                + (f"; PROBLEMS: {scan.problems}" if scan.problems else ''))
            if scan.problems:
                problems.extend(f"after kill {len(kills)}: {p}" for p in scan.problems)
            continue
        if killed:
            # The kill raced the child's normal exit; it did not interrupt anything.
            kills.pop()
        if attempt.exit_code == 0:
            finished = True
        else:
            failure = (f'attempt {attempt.index} exited with status {attempt.exit_code}; '
                       f'log tail:\n{"".join(child.tail[-15:])}')
        break
    scan = scan_work_dir(work_dir)
    problems.extend(f'at the end: {p}' for p in scan.problems)
    return dict(attempts=[dataclasses.asdict(a) for a in attempts], kills=kills,
                skipped_kills=skipped, problems=problems, finished=finished, failure=failure,
                final_checkpoint=scan.last_checkpoint if finished else None,
                temp_files=scan.temp_files)

