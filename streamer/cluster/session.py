"""Stopping `sparrow-stream cluster` on SIGTERM / SIGINT: promptly, in order, and with no Ray process left.

Why two processes for a local Ray: `ray.init()` starts the GCS and the raylet as children of the driver, in
the driver's process group, and the raylet starts every worker (the replicas, Serve's controller) in it too.
Ray blocks SIGINT in those processes, not SIGTERM, so a SIGTERM sent to the group (`kill -- -PGID`, GNU
`timeout`, a supervisor that signals the group) killed the GCS, the raylet and the replicas at once: the
driver's `serve.delete` then waited for a GCS that was gone until Ray's client gave up ("Failed to connect to
GCS within 60 seconds"), and the process exited 1 after ~60 s, with no replica drained.

`run_in_own_session` forks before Ray starts: the child (the Ray driver, and through it every Ray process)
leads a session of its own, so only this process gets a signal meant for the command's group; it forwards it
to the child, which stops Serve and Ray in order. Forwarding waits until the child says it handles signals
itself (`ready`): while `ray.init()` runs, Ray's own handlers are in place (Python's `sys.exit` for SIGTERM,
then its C++ core's crash handler, which aborts), and a signal then left the node half started (rc 15 or 134,
Ray's agents orphaned for a minute). If this process dies without a signal (SIGKILL), the kernel sends the
child SIGTERM (PR_SET_PDEATHSIG); if the child is killed, Ray's fate-sharing takes its GCS and raylet with it.

`StopSignals` is the driver's side: each signal sets an event the driver waits on; while Serve starts the app
(loading the model can take a while) a signal also interrupts the start (`Stopping`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


class Stopping(Exception):
    """A stop signal arrived while the cluster was starting."""


class StopSignals:
    """SIGTERM / SIGINT handlers for the driver. Each signal sets the event `wait` returns on; inside
    `interrupting()` it also raises `Stopping` (a start that may be abandoned: the driver's `finally` stops what
    had started)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signal_name = ""
        self._interrupt = False

    def _on_signal(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.stop.set()
        if self._interrupt:
            self._interrupt = False  # once: a second signal must not interrupt the cleanup
            raise Stopping(self.signal_name)

    def install(self) -> None:
        """Set the handlers (again after `ray.init`, which sets its own)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    @contextmanager
    def interrupting(self) -> Iterator[None]:
        if self.stop.is_set():
            raise Stopping(self.signal_name)
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def wait(self) -> str:
        """The name of the signal, once one came."""
        self.stop.wait()
        return self.signal_name


def _die_with_parent(sig: int, parent: int) -> None:
    """The kernel sends this process `sig` when its parent dies (Linux); no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the prctl
        os.kill(os.getpid(), sig)


def run_in_own_session(main: Callable[[Callable[[], None]], int]) -> int:
    """Run main(ready) in a forked child that leads a new session; this process forwards SIGTERM / SIGINT to it
    once it has called ready() (one that came before is held until then) and returns its exit status (128 + N if
    a signal N killed it). Fork before any thread or Ray is started."""
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    told_r, told_w = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until each side has its handlers
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(told_r)
            os.setsid()
            _die_with_parent(signal.SIGTERM, parent)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # Ray's processes must not inherit a blocked SIGTERM

            def ready() -> None:
                os.write(told_w, b"1")
                os.close(told_w)

            code = main(ready)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    os.close(told_w)
    held: list[int] = []
    forwarding = False

    def forward(signum: int, frame) -> None:
        if not forwarding:
            held.append(signum)
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        os.read(told_r, 1)  # b"1" once the child handles signals, b"" if it exited first
        os.close(told_r)
        forwarding = True
        if held:
            forward(held[0], None)
        _, status = os.waitpid(pid, 0)  # retried after each forwarded signal (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code
