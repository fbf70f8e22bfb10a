"""Choosing and loading a generator backend by name."""

from __future__ import annotations

import importlib
import threading
from typing import Any

from tasks.generate.base import Generator
from tasks.records import DEFAULT_PRECISION

BACKENDS = ("preview", "wan-s2v")

_loaded: dict[tuple, Generator] = {}
_lock = threading.Lock()


class BackendError(Exception):
    """The requested backend cannot run (unknown name, no checkpoint, model stack missing)."""


def resolve_backend(backend: str, checkpoint: str | None) -> str:
    """'auto' means the model when a checkpoint is configured and the preview animatic otherwise."""
    if backend == "auto":
        return "wan-s2v" if checkpoint else "preview"
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend == "wan-s2v" and not checkpoint:
        raise BackendError("backend 'wan-s2v' needs a checkpoint: pass --checkpoint or set S2V_CHECKPOINT")
    return backend


def load_generator(
    backend: str,
    checkpoint: str | None = None,
    *,
    device: str | None = None,
    offload: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> Generator:
    """Load a backend once per process and reuse it (the model takes minutes to load)."""
    key = (backend, checkpoint, device, offload, precision)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _build(backend, checkpoint, device, offload, precision)
        return _loaded[key]


def build_generator(
    backend: str,
    checkpoint: str | None,
    device: str | None,
    offload: bool,
    options: dict[str, Any],
    precision: str = DEFAULT_PRECISION,
) -> Generator:
    """A backend by name through `load_generator`, or a 'module:callable' factory called as
    factory(checkpoint, device=, offload=, **options) (its precision is up to its options)."""
    if ":" in backend:
        module, _, attr = backend.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        return factory(checkpoint, device=device, offload=offload, **options)
    return load_generator(backend, checkpoint, device=device, offload=offload, precision=precision)


def _build(backend: str, checkpoint: str | None, device: str | None, offload: bool, precision: str) -> Generator:
    if backend == "preview":
        from tasks.generate.preview import PreviewGenerator

        return PreviewGenerator()
    if backend == "wan-s2v":
        try:
            from tasks.generate.wan_s2v import WanS2VGenerator
        except ImportError as exc:
            raise BackendError(
                f"backend 'wan-s2v' needs the model stack: pip install 's2v-batch[model]' ({exc})"
            ) from None
        # Always named: the batch's precision is what the worker promises its segments (an fp8-scaled
        # ComfyUI file left to pick its own would run fp8 in a batch that says bf16).
        return WanS2VGenerator(checkpoint, device=device, offload=offload, precision=precision)
    raise BackendError(f"unknown backend {backend!r}")
