"""Measuring audio in this process: EBU R128 loudness, true peak and the decoded samples, through PyAV's
filter graphs (the libavfilter filters the ffmpeg binary runs, in the library PyAV bundles).

Why not an ffmpeg run: starting the static ffmpeg binary costs ~13 ms of CPU (some 2,000 page faults
and its relocations) however short the audio, about as much as measuring a 5-second clip, and a row
was measured two or three times (docs/benchmarks.md, "`plan` at scale"). The outputs are still
written by one ffmpeg run (``tasks/normalize/audio.py``).

The figures are those `ebur128`'s summary prints, read from what the filter attaches to the frames it
passes on (``metadata=1``): the integrated loudness and loudness range after the last 100 ms block,
rounded to the summary's 0.1; the true peak is the largest sample of the signal resampled to 192 kHz
(how `ebur128` measures it, with the resampler's same defaults), rounded the same way: a branch of
its own because the peak `ebur128` attaches to frames is linear and printed to 3 decimals, too coarse
for quiet audio. The gating
threshold is not among them (``threshold`` None): loudnorm's fallback, its one user, measures with
ffmpeg.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

Chain = list[tuple[str, tuple, dict]]
"""Filters as ffmpeg-python's ``stream.filter(name, *args, **kwargs)`` takes them, so one chain is
built once and run either here or by the ffmpeg binary."""
TRUE_PEAK_RATE = 192_000
PROBE_BYTES = 32_768


@dataclass(frozen=True)
class Loudness:
    """What an EBU R128 measurement reports."""

    integrated: float
    lra: float
    threshold: float | None
    true_peak: float


def filter_spec(args: tuple, kwargs: dict) -> str:
    """A filter's arguments as ffmpeg writes them ("a:b:key=value")."""
    return ":".join([*(str(a) for a in args), *(f"{k}={v}" for k, v in kwargs.items())])


def _round(value: float) -> float:
    return round(value, 1) if np.isfinite(value) else value


def measure(src: Path, chain: Chain, *, channels: int,
            on_samples: Callable[[np.ndarray], None] | None = None) -> Loudness | None:
    """Decode the first audio stream of ``src`` through ``chain`` and measure the result; hand its samples
    (float32, frames × ``channels``, in the decoder's pieces) to ``on_samples`` as they come. None when
    nothing was decoded. Raises av.error.FFmpegError for a file or graph that cannot be used."""
    meter: dict[str, str] = {}
    peak = 0.0
    with _open_audio(src) as container:
        stream = container.streams.audio[0]
        graph = sinks = source = None
        for frame in _frames(container, stream):
            if graph is None:
                graph, source, sinks = _graph(frame, chain, on_samples is not None)
                same_as_first = _Conform(frame)
            try:
                for piece in same_as_first(frame):
                    source.push(piece)
            except av.error.EOFError:  # the chain has ended (atrim): the rest is not needed
                break
            peak = _drain(sinks, meter, peak, channels, on_samples)
        if graph is None:
            return None
        with contextlib.suppress(av.error.EOFError):
            for piece in same_as_first.flush():
                source.push(piece)
            source.push(None)
        peak = _drain(sinks, meter, peak, channels, on_samples)
    if not meter:
        return None
    true_peak = 20.0 * np.log10(peak) if peak > 0 else -np.inf
    return Loudness(integrated=_round(float(meter["lavfi.r128.I"])), lra=_round(float(meter["lavfi.r128.LRA"])),
                    threshold=None, true_peak=_round(float(true_peak)))


@contextlib.contextmanager
def _open_audio(src: Path) -> Iterator[av.container.InputContainer]:
    """The file opened with a small probe, or with the default one where the small probe saw no audio
    stream (audio that starts late in a video file). Raises av.error.FFmpegError (also for a file
    without audio) or OSError."""
    # A small probe first: the graph takes its format from the first decoded frame, and the default
    # 5 MB probe decoded seconds of 16-bit WAV only to find what its header says (7 ms of a 5-s row).
    container = av.open(str(src), options={"probesize": str(PROBE_BYTES)})
    if not container.streams.audio:
        container.close()
        container = av.open(str(src))
    try:
        if not container.streams.audio:
            raise av.error.InvalidDataError(0, "no audio stream", str(src))
        yield container
    finally:
        container.close()


def _frames(container, stream) -> Iterator[av.AudioFrame]:
    """The stream's decoded frames, as the ffmpeg binary reads them: a packet that fails to decode is
    skipped, and a read error past the start ends the input (damaged or chained files)."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError:
            return  # the rest cannot be read: what was decoded stands (a short result is judged later)
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            continue  # a damaged packet: ffmpeg logs it and goes on
        yield from frames


class _Conform:
    """Frames in the first frame's sample format, layout and rate. A stream may change them partway
    (MP3 files joined with `cat`); the graph, built for the first frame, cannot take the change, so
    frames that differ go through a resampler of their own (the ffmpeg binary rebuilds its graph
    instead). Frames like the first pass untouched."""

    def __init__(self, first: av.AudioFrame) -> None:
        self._key = _params(first)
        self._target = {"format": first.format.name, "layout": first.layout.name, "rate": first.sample_rate}
        self._resamplers: dict[tuple, av.AudioResampler] = {}

    def __call__(self, frame: av.AudioFrame) -> list[av.AudioFrame]:
        key = _params(frame)
        if key == self._key:
            return [frame]
        if key not in self._resamplers:
            self._resamplers[key] = av.AudioResampler(**self._target)
        return [_retimed(piece) for piece in self._resamplers[key].resample(frame)]

    def flush(self) -> list[av.AudioFrame]:
        return [_retimed(piece) for r in self._resamplers.values() for piece in r.resample(None)]


def _params(frame: av.AudioFrame) -> tuple:
    return frame.format.name, frame.layout.name, frame.sample_rate


def _retimed(frame: av.AudioFrame) -> av.AudioFrame:
    frame.pts = None  # the graph keeps its own clock; a resampled piece's timestamps are another rate's
    return frame


def _graph(first: av.AudioFrame, chain: Chain, samples: bool):
    """The graph: ``chain``, then split to `ebur128`, to the 192 kHz true-peak branch and (``samples``)
    to float32 samples."""
    graph = av.filter.Graph()
    source = graph.add_abuffer(format=first.format.name, layout=first.layout.name, sample_rate=first.sample_rate,
                               time_base=first.time_base)  # fmt: skip
    node = source
    for name, args, kwargs in chain:
        nxt = graph.add(name, filter_spec(args, kwargs))
        node.link_to(nxt)
        node = nxt
    split = graph.add("asplit", "3" if samples else "2")
    node.link_to(split)
    branches = [
        [("ebur128", "metadata=1")],
        [("aformat", "sample_fmts=dbl"), ("aresample", str(TRUE_PEAK_RATE))],
        *([[("aformat", "sample_fmts=flt")]] if samples else []),
    ]
    sinks = []
    for k, branch in enumerate(branches):
        node, out = split, k
        for name, spec in branch:
            nxt = graph.add(name, spec)
            node.link_to(nxt, out)
            node, out = nxt, 0
        sink = graph.add("abuffersink")
        node.link_to(sink)
        sinks.append(sink)
    graph.configure()
    return graph, source, sinks


def _drain(sinks, meter: dict[str, str], peak: float, channels: int,
           on_samples: Callable[[np.ndarray], None] | None) -> float:
    """Take every frame the sinks hold; returns the true peak so far."""
    for k, sink in enumerate(sinks):
        while True:
            try:
                frame = sink.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            if k == 0:
                if frame.metadata:  # set on frames where a 100 ms block ended
                    meter.update(frame.metadata)
            elif k == 1:
                x = frame.to_ndarray()
                if x.size:
                    peak = max(peak, float(np.abs(x).max()))
            else:
                on_samples(frame.to_ndarray().reshape(-1, channels))
    return peak
