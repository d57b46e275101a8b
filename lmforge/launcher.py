"""`lmforge train --nproc N`: run torchrun so that no process of the job outlives the launcher.

Why: a launcher killed with SIGKILL used to leave torchrun and its workers running; they kept
training and writing checkpoints into the run directory while the next job wrote into it too.
Three links close that:

- the launcher starts torchrun through `python -m lmforge.launcher PID ...`, which asks the
  kernel to send it SIGTERM when the launcher dies (prctl PR_SET_PDEATHSIG) before it becomes
  torchrun (torchrun then stops its workers, as on any SIGTERM);
- every torchrun worker asks for SIGKILL when torchrun dies (`guard_worker`), so even a
  SIGKILLed torchrun leaves no worker behind;
- the launcher passes SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 on to torchrun (which runs in
  its own process group, so Ctrl-C reaches it once, through the launcher).

A stop signal (SIGTERM, SIGINT, SIGHUP) must stop the job even when torchrun misses it (a CI run
once saw a job train on for minutes after its launcher got SIGTERM). So if torchrun has not
exited `RESEND_AFTER_S` after a stop signal, the launcher sends it again, and after
`KILL_AFTER_S` (torchrun gives its workers 30 s to stop before it kills them) it kills torchrun's
process group; the workers then die with torchrun (`guard_worker`). The launcher never blocks in one
long wait for torchrun, so a signal the kernel hands to another of its threads is still acted on
(`supervise`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

__all__ = ["FORWARDED_SIGNALS", "LAUNCHER_PID_ENV", "STOP_SIGNALS", "guard_worker", "run_supervised",
           "set_parent_death_signal", "supervise"]

PR_SET_PDEATHSIG = 1
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
RESEND_AFTER_S = 10.0
KILL_AFTER_S = 60.0
WAIT_SLICE_S = 1.0
LAUNCHER_PID_ENV = "LMFORGE_LAUNCHER_PID"


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send `sig` to this process when its parent dies (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def guard_worker() -> None:
    """In a torchrun worker: die (SIGKILL) when torchrun dies; leave at once if the launcher that
    started this job is already gone (it died before the parent-death signal was armed). No test
    of the parent pid: in a container torchrun itself is often pid 1."""
    set_parent_death_signal(signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit() and not _alive(int(launcher)):
        os._exit(1)


def run_supervised(torchrun_cmd: Sequence[str], env: dict[str, str], pass_fds: Sequence[int] = ()) -> int:
    """Run `torchrun_cmd` ([python, "-m", "torch.distributed.run", ...]) under the parent-death
    wrapper in its own process group, passing signals on; returns its exit code."""
    if list(torchrun_cmd[1:3]) != ["-m", "torch.distributed.run"]:
        raise ValueError(f"not a torchrun command: {list(torchrun_cmd[:3])}")
    cmd = [torchrun_cmd[0], "-m", "lmforge.launcher", str(os.getpid()), *torchrun_cmd[3:]]
    child = subprocess.Popen(cmd, env={**env, LAUNCHER_PID_ENV: str(os.getpid())}, pass_fds=tuple(pass_fds),
                             process_group=0)
    return supervise(child)


def supervise(child: subprocess.Popen, resend_after_s: float = RESEND_AFTER_S,
              kill_after_s: float = KILL_AFTER_S) -> int:
    """Wait for `child` (the leader of its own process group), passing FORWARDED_SIGNALS on; after
    a stop signal, send it again at `resend_after_s` and kill the child's process group at
    `kill_after_s` if the child is still running. Returns its exit code (negative: its signal)."""
    timers: list[threading.Timer] = []

    def resend(sig: int) -> None:
        if child.returncode is None:
            child.send_signal(sig)

    def kill_group() -> None:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    def forward(sig: int, _frame: object) -> None:
        child.send_signal(sig)
        if sig in STOP_SIGNALS and not timers:
            timers.extend([threading.Timer(resend_after_s, resend, (sig,)), threading.Timer(kill_after_s, kill_group)])
            for timer in timers:
                timer.daemon = True
                timer.start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    try:
        while True:
            # Short waits, not one blocking waitpid: the kernel may hand a signal sent to this
            # process to another of its threads (torch's OpenMP workers; e.g. when the main thread
            # was just continued after SIGSTOP, as on Slurm's SIGCONT-then-SIGTERM), and Python runs
            # the handler only when the main thread next executes bytecode. Blocked in waitpid it
            # never would, and the job trained on. Popen.wait(timeout) polls every <= 50 ms.
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=WAIT_SLICE_S)
    finally:
        for timer in timers:
            timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _torchrun_with_parent_death(argv: list[str]) -> None:
    """`python -m lmforge.launcher LAUNCHER_PID ARGS...`: torchrun ARGS, dying with the launcher."""
    launcher = int(argv[0])
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        sys.exit(1)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    sys.argv = ["torch.distributed.run", *argv[1:]]
    try:
        run(parse_args(argv[1:]))
    except ChildFailedError as e:
        # Each worker has printed its own one-line error; torchrun's multi-line report would bury it.
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code != 2:  # 2: a user error, already explained by the worker
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"lmforge train: rank {rank} {how}; its output above says why", file=sys.stderr, flush=True)
        sys.exit(code if 0 < code < 256 else 1)
    except SignalException as e:  # torchrun stopped its workers on a signal; leave as that signal would
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    _torchrun_with_parent_death(sys.argv[1:])
