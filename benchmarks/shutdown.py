"""Stopping a run: Ctrl-C, SIGTERM and SIGHUP all unwind the same way, and leave nothing behind.

A driver calls ``install()`` first. From then on the first stop signal raises
``Interrupted`` (a ``KeyboardInterrupt``) in the main thread, so every
``finally`` on the way out runs: each child's process group is killed and
reaped, databases are dropped, the work directory is removed. Later signals
are ignored, so they cannot cut that cleanup short. Inside an event loop,
``cancelled_on_signal()`` turns the signal into a cancellation of the running
task instead (asyncio's own way for Ctrl-C) and raises ``Interrupted`` once
the task has unwound. Code that starts a process runs under ``held()``, which
delays the signal until the process is recorded, so none escapes the cleanup.

Under GNU make, SIGTERM to make reaches the driver (make forwards it), but
make answers SIGHUP by waiting for its recipe to end. The driver watches a
parent ``make``: once make handles a stop signal (it blocks it and resets it
to the default, see /proc/PID/status) or is gone, the driver stops as if it
had got the signal itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAKE_POLL_S = 0.2
T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived: the run unwinds like Ctrl-C and exits with 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by the signal."""
        return 128 + self.signum


class _State:
    """What the handlers share (signal handlers run in the main thread only)."""

    handled: tuple[int, ...] = ()
    requested: int | None = None
    """The first stop signal."""
    raised = False
    held = 0


_state = _State()


def install() -> None:
    """Route Ctrl-C, SIGTERM and SIGHUP to ``Interrupted`` (one ignored at start stays: nohup)."""
    handled = []
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_IGN:
            continue
        signal.signal(sig, _on_signal)
        handled.append(sig)
    _state.handled = tuple(handled)
    _watch_make()


def stopped(driver: str, exc: Interrupted) -> int:
    """Say that the run stopped on ``exc``'s signal, leaving nothing behind; its exit status."""
    print(
        f"[{driver}] interrupted ({exc}): every process stopped, no results written",
        file=sys.stderr,
        flush=True,
    )
    return exc.exit_status


def _on_signal(signum: int, frame: object) -> None:
    if _state.requested is not None:
        return  # already stopping: the cleanup must run to its end
    _state.requested = signum
    if _state.held:
        return  # raised when the held block ends
    _state.raised = True
    raise Interrupted(signum)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Delay a stop signal until the block ends (main thread), e.g. while a child is recorded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.held += 1
    try:
        yield
    finally:
        _state.held -= 1
        # raised even if the block failed: the stop request must not get lost with its error
        if not _state.held and _state.requested is not None and not _state.raised:
            _state.raised = True
            raise Interrupted(_state.requested)


@contextlib.asynccontextmanager
async def cancelled_on_signal() -> AsyncIterator[None]:
    """In a running loop: a stop signal cancels the current task, then raises ``Interrupted``."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop(signum: int) -> None:
        if _state.requested is None:
            _state.requested = signum
            task.cancel()

    for sig in _state.handled:
        loop.add_signal_handler(sig, stop, sig)
    try:
        yield
    except asyncio.CancelledError:
        if _state.requested is None or _state.raised:
            raise
        task.uncancel()
        _state.raised = True
        raise Interrupted(_state.requested) from None
    finally:
        for sig in _state.handled:
            loop.remove_signal_handler(sig)  # this restores the default: put ours back
            signal.signal(sig, _on_signal)
    if _state.requested is not None and not _state.raised:
        task.uncancel()  # the signal came as the body finished
        _state.raised = True
        raise Interrupted(_state.requested)


async def completed(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile (then re-raise).

    For what must not be left half done: a database cluster starting while its
    cleanup already ran would outlive the run.
    """
    job = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await job
        raise


def _signal_set(pid: int, field: str) -> set[int]:
    """A signal mask from /proc/PID/status (``SigBlk``, ``SigCgt``) as signal numbers."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            mask = int(value.strip(), 16)
            return {bit + 1 for bit in range(64) if mask >> bit & 1}
    return set()


def _watch_make() -> None:
    """Under make: stop when make handles a stop signal (or is gone) and waits for us."""
    parent = os.getppid()
    try:
        name = Path(f"/proc/{parent}/comm").read_text().strip()
        caught = _signal_set(parent, "SigCgt")
    except OSError:
        return
    if name not in ("make", "gmake"):
        return
    watched = [sig for sig in _state.handled if sig in caught]
    threading.Thread(target=_watch, args=(parent, watched), name="make-watch", daemon=True).start()


def _watch(parent: int, watched: list[Any]) -> None:
    while True:
        time.sleep(MAKE_POLL_S)
        try:
            if os.getppid() != parent:
                raise OSError("make is gone")
            blocked = _signal_set(parent, "SigBlk")
            caught = _signal_set(parent, "SigCgt")
        except OSError:
            os.kill(os.getpid(), signal.SIGHUP)
            return
        for sig in watched:
            # make's handler blocks the signal and resets it to the default while it waits
            if sig in blocked and sig not in caught:
                os.kill(os.getpid(), sig)
                return
