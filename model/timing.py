"""Where loading time goes: `LoadTimings`, filled by the loaders and kept as `pipe.load_timings`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LoadTimings:
    """Seconds spent by `S2VPipeline.from_checkpoint`, by kind of work and by component.

    CUDA work is synchronised at the end of each phase, so a phase's seconds are its own."""

    check_s: float = 0.0  # resolving the files and checking their headers (nothing large is read)
    read_s: float = 0.0  # weights from disk onto the device (dtype casts on the way included)
    build_s: float = 0.0  # modules on the meta device, key renaming, fp8 (de)quantization, tokenizer
    to_device_s: float = 0.0  # moving built modules (offload: packing the blocks into pinned memory)
    total_s: float = 0.0
    components: dict[str, float] = field(default_factory=dict)  # wall seconds per component

    def phase(self, kind: str, device: torch.device | str | None = None) -> AbstractContextManager:
        """Add the block's wall time to `<kind>_s` (check, read, build, to_device)."""
        attr = f"{kind}_s"
        return _timed(device, lambda s: setattr(self, attr, getattr(self, attr) + s))

    def component(self, name: str, device: torch.device | str | None = None) -> AbstractContextManager:
        """Add the block's wall time to `components[name]`."""
        return _timed(device, lambda s: self.components.__setitem__(name, self.components.get(name, 0.0) + s))

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else {n: round(s, 3) for n, s in v.items()}
                for k, v in asdict(self).items()}  # fmt: skip


def phase(timings: LoadTimings | None, kind: str, device: torch.device | str | None = None) -> AbstractContextManager:
    """`timings.phase(kind, device)`, or a no-op without timings."""
    return timings.phase(kind, device) if timings is not None else nullcontext()


@contextmanager
def _timed(device: torch.device | str | None, add: Callable[[float], None]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        add(time.perf_counter() - start)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
