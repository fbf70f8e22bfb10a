"""A tiny hook through which a running batch reports progress to whoever listens (the CLI's display).

Prefect shows the same events as task runs in its UI; this hook exists because the
terminal display lives in the same process and needs them without polling the API.
"""

from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[str, str, str], None]
"""Called as listener(row_id, event, detail); events: stage names, 'clip', 'done', 'failed'."""

_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Add a listener; returns a function that removes it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def emit(row_id: str, event: str, detail: str = "") -> None:
    for listener in list(_listeners):
        listener(row_id, event, detail)
