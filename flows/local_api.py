"""The local Prefect API of a `run` without PREFECT_API_URL, started so that it outlives Ctrl-C.

Prefect starts its ephemeral API (a uvicorn subprocess) inside the caller's process group, so the
SIGINT a terminal sends on Ctrl-C reaches it too: it died first, and the interrupted flow could no
longer record its state (tracebacks, minutes of retries, exit 2). `start` launches the same server
in a process group of its own, as the instance Prefect's clients find and reuse (Prefect keeps one
ephemeral server per process, `SubprocessASGIServer._instances`); `flows/interrupt.py` stops it last.
The server asks the kernel to end it when this process ends (PR_SET_PDEATHSIG), so no server is
left behind even after a kill -9.

Its start-up waits up to `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS` when that is set
(environment or Prefect profile), else `DEFAULT_STARTUP_TIMEOUT_S` rather than Prefect's 20 s, which
a loaded machine overran; a start that times out says which setting to raise.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile

STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 90
"""The local API's start-up limit unless the setting says otherwise: a loaded 2-core machine took
over Prefect's 20 s default (issue 16); 90 s covers that with room and still fails a broken start."""
_PR_SET_PDEATHSIG = 1
_started = None
_LOG = tempfile.TemporaryFile()  # noqa: SIM115 - the server's log, as long as this process lives


class LocalApiError(Exception):
    """The local Prefect API did not start; the message names the setting to change."""


def start():
    """Start the local Prefect API for this process when no PREFECT_API_URL is set (and ephemeral
    mode is on); returns the server, or None when a configured API is used."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None

    class DetachedServer(SubprocessASGIServer):
        """Prefect's ephemeral server, launched in a process group of its own."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            import prefect
            from prefect.settings import get_current_settings

            # The command and environment are Prefect's own (SubprocessASGIServer._run_uvicorn_command);
            # what differs is where it runs: its own process group, ended with this process.
            settings = get_current_settings().to_environment_variables(exclude_unset=True)
            # Its log goes to a file: a server being stopped prints shutdown tracebacks that do not
            # belong on the terminal of an interrupted run; a failed start quotes the file's end.
            return subprocess.Popen(
                [sys.executable, "-m", "flows.local_api", "--app-dir", str(prefect.__module_path__.parent),
                 "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1", **settings},
                process_group=0, stdout=_LOG, stderr=subprocess.STDOUT,
            )

    global _started
    server = DetachedServer()  # registers itself as the instance Prefect's clients use
    timeout = startup_timeout()
    try:
        server.start(timeout=timeout)
    except RuntimeError:
        server.stop()
        raise LocalApiError(
            f"the local Prefect API did not start within {timeout} s ({STARTUP_SETTING}={timeout}): the machine "
            f"may be loaded; raise it (e.g. {STARTUP_SETTING}=300) or run a Prefect server and set PREFECT_API_URL"
            + (f" (its log ends: {last})" if (last := _last_log_line()) else "")
        ) from None
    _started = server
    return server


def _last_log_line() -> str:
    _LOG.seek(0)
    lines = [ln.strip() for ln in _LOG.read()[-4000:].decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def startup_timeout() -> int:
    """The setting when the user set it (environment or profile), else `DEFAULT_STARTUP_TIMEOUT_S`."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return int(ephemeral.startup_timeout_seconds)
    return DEFAULT_STARTUP_TIMEOUT_S


def stop() -> None:
    """Stop the local API `start` started, if any: the last thing an interrupted run does (a run that
    ends normally leaves that to Prefect's at-exit handler)."""
    global _started
    if _started is not None:
        _started.stop()
        _started = None


def _serve() -> None:
    """Entry point of the server process: ask to be ended with the parent, then run uvicorn with the
    given arguments."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        sys.exit(1)
    from uvicorn.main import main as uvicorn

    sys.argv = ["uvicorn", *sys.argv[1:]]
    uvicorn()


if __name__ == "__main__":
    _serve()
