"""Ctrl-C and SIGTERM end a `run` promptly and in order, keeping every finished row and clip.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group; a scheduler (systemd,
Kubernetes, Slurm) sends SIGTERM, often to the main process alone. Both mean the same here:

1. the first signal ends the ffmpeg jobs this process started (a group signal has already done so)
   and cancels the batch: the flow and its row subflows stop at their next await, Prefect records
   them as crashed (the local API is still up: `flows/local_api.py`), the GPU pool closes and the
   output's lock is released (their `finally` blocks run);
2. worker threads still busy (a clip being rendered) are not waited for: what they have not
   finished is written to temporary `.part` files, which the next run removes; finished rows (their
   markers) and clips (written atomically) stay and a rerun resumes from them;
3. the caller (flows/cli.py) stops the local API last, prints one line and exits with 130.

A second signal while that happens ends the process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_CODE = 130
"""What shells report for a job ended by SIGINT (128 + 2); used for SIGTERM too, as 'interrupted'."""
SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 30.0
"""How long an interrupted batch may take to record its end (Prefect states, the pool's shutdown)."""


class Interrupted(Exception):
    """The run was stopped by a signal; finished work is kept."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Outside the event loop (checks, the local API's start): SIGINT and SIGTERM raise Interrupted
    where the main thread is, so the usual clean-up runs (Python's default for SIGTERM is to die
    on the spot, leaving the local API behind)."""

    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on an event loop of its own thread until it ends, or until SIGINT/SIGTERM, which
    cancel it (see the module docstring); raises Interrupted then.

    The loop runs outside the main thread so that the signals stay ours: Prefect's flow engine, run in
    the main thread, replaces the SIGTERM handler with one raising an exception wherever the loop
    happens to be, which tore the loop down mid-step (tracebacks, exit 1). In another thread it leaves
    the handlers alone, and the main thread turns a signal into a cancellation of the batch.
    """
    loop = asyncio.new_event_loop()
    main = loop.create_task(coro)
    outcome: dict[str, Any] = {}
    received: list[int] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome["result"] = loop.run_until_complete(main)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = exc
        # Threads of an interrupted run are left to die with the process (see 2. above), and the loop
        # open: a thread finishing meanwhile hands its result to it instead of failing on a closed loop.
        if not received:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def on_signal(signum: int, _frame: Any) -> None:
        if received:  # a second signal: stop waiting for the orderly end
            end_ffmpeg_children()
            exit_now()
        received.append(signum)
        quiet_console()
        end_ffmpeg_children()
        loop.call_soon_threadsafe(main.cancel)

    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    thread = threading.Thread(target=serve, name="s2v-batch-loop", daemon=True)
    try:
        thread.start()
        deadline = None
        while thread.is_alive():
            thread.join(0.2)  # short waits: the signal handlers run between them
            if received and deadline is None:
                deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        raise Interrupted(received[0])
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def quiet_console() -> None:
    """Keep the terminal to the one line of an interrupted run: Prefect's console handlers would print a
    "Crash detected!" per running task and subflow. Its API handler still records them in the UI."""
    import logging

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "tasks", "model", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):  # not the API handler (a plain Handler)
                handler.setLevel(logging.CRITICAL + 1)


def end_ffmpeg_children() -> None:
    """End the ffmpeg processes this process started (normalization, encoding, stitching): an interrupted
    run does not wait for them. Only ffmpeg: the local API and a local Ray end their own way."""
    import psutil

    from tasks.media import ffmpeg_exe

    binary = os.path.basename(ffmpeg_exe())
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name() == binary[:15] or os.path.basename(child.exe()) == binary:
                child.kill()


def exit_now() -> None:
    """Leave without waiting for worker threads (a clip mid-render) or at-exit handlers: what had to be
    kept is kept, and `os._exit` is the only exit that does not join the threads."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)
