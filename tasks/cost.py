"""Cost model: estimated GPU seconds and money of a plan's segments and rows.

The per-forward and per-clip costs measured on an H100 (docs/benchmarks.md) for exact and distilled
mode, the GPU kinds and their speed relative to an H100, the `CostModel` the planner (tasks/plan.py)
prices each segment with, and the ``s2v-batch plan --json`` document that sums them per row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from model.presets import DISTILLED_INFER_FRAMES, DISTILLED_STEPS, SpeedConfig
from tasks.records import Plan, Resolution

# --------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class ForwardCost:
    """Seconds per DiT forward pass: the first clip of a segment and the clips after it.

    Later clips carry the motion-frame tokens (about 35,074 instead of 32,760 tokens at
    480p), so they cost more.
    """

    first_clip_s: float
    later_clip_s: float


# Our pipeline on one H100 (docs/benchmarks.md, "Memory of a full clip"): a full 480x832
# 80-frame clip through S2VPipeline with random bf16 weights, compiled DiT (the CUDA default),
# SDPA attention, CFG as a batch of 2, measured 5.95 s per denoising step for a first clip and
# 6.54 s for a later one (motion tokens), i.e. 2.975 s and 3.27 s per forward; the rest of a clip
# (text/audio encoding, VAE decode, motion re-encode) came to about 7 s. With FA4 (the worker
# image) a whole 480p clip measured 9 % faster (223 s / 245 s for 40 steps, first / later clip);
# the SDPA figures stay so the estimate never undershoots on installs without FA4.
# 720p: our compiled DiT's first-clip forward, 11.6 s ("Speed per forward"); the later-clip
# figure is scaled by the 480p later/first ratio.
DEFAULT_FORWARD_COSTS: dict[tuple[str, str], ForwardCost] = {
    ("H100", Resolution.P480.value): ForwardCost(first_clip_s=2.975, later_clip_s=3.27),
    ("H100", Resolution.P720.value): ForwardCost(first_clip_s=11.6, later_clip_s=round(11.6 * 3.27 / 2.975, 2)),
}
DEFAULT_OVERHEAD_PER_CLIP_S = 7.0

# Distilled mode (model/distilled.py: LiveAvatar's 4 steps, clips of 48 frames = 4 blocks): a DiT
# pass is one block-step. Measured on one H100 (docs/benchmarks.md, "Distilled mode"; random bf16
# weights, compiled blocks, SDPA: the attention without the optional FA4): at 480p the KV cache only
# fits beside a DiT streamed from host memory, and so a segment's first clip (the pipeline's fill)
# took 14.2 s and a steady clip 10.1 s, i.e. 0.89 s and 0.63 s per pass (decode included). A
# segment's other fixed 6 s (audio, the reference encode, the condition pass, the fill's and the
# drain's difference) is spread over a 60 s segment's 20 clips as 0.3 s a clip: this formula has no
# per-segment term, so short segments come out a little low. With FA4 (and the bf16 VAE and split
# attention since) a steady clip took 8.35 s, ~18 % less; this SDPA figure predates those. 720p
# is not offered (its KV cache would need 139 GiB).
DISTILLED_FORWARD_COSTS: dict[tuple[str, str], ForwardCost] = {
    ("H100", Resolution.P480.value): ForwardCost(first_clip_s=0.89, later_clip_s=0.63),
}
DISTILLED_OVERHEAD_PER_CLIP_S = 0.3


@dataclass(frozen=True)
class GpuKind:
    """A GPU's DiT throughput relative to one H100 (SXM, 80 GB): seconds there = H100 seconds / speed."""

    name: str
    relative_speed: float
    memory_gb: int
    source: str
    measured: bool = False
    """True where the figure is our own measurement; otherwise it is taken from the named source."""


# Relative speeds. Only the H100 is measured here (docs/benchmarks.md); the others are the ratio of
# the vendor's peak dense BF16 tensor throughput to the H100 SXM's 989 TFLOP/s. The DiT runs near
# that peak on an H100 (1.19x the matmul floor with FA4), so for compute-bound GPUs the ratio is
# an estimate of the right size, optimistic for GPUs without FA4 (A100, Ada: SDPA attention runs
# at ~70 % of the GEMM rate) or with slower host links (24-48 GB cards stream the blocks from host
# memory; that stays hidden behind compute at these speeds). Memory: below 80 GB the pool needs
# `offload` (block streaming, measured as fast as resident on an H100).
GPU_KINDS: dict[str, GpuKind] = {
    g.name: g
    for g in (
        GpuKind("H100", 1.0, 80, "measured here: 480p clip through the pipeline, docs/benchmarks.md", measured=True),
        GpuKind("H200", 1.0, 141, "vendor: NVIDIA H200 datasheet, 989 dense BF16 TFLOP/s, the H100 SXM's compute"),
        GpuKind("H100 PCIe", round(756 / 989, 2), 80, "vendor: NVIDIA H100 datasheet, PCIe 756 dense BF16 TFLOP/s"),
        GpuKind("A100", round(312 / 989, 2), 80, "vendor: NVIDIA A100 datasheet, 312 dense BF16 TFLOP/s"),
        GpuKind("L40S", round(362 / 989, 2), 48, "vendor: NVIDIA L40S datasheet, 362 dense BF16 TFLOP/s"),
        GpuKind(
            "RTX 6000 Ada", round(364 / 989, 2), 48,
            "vendor: NVIDIA RTX 6000 Ada datasheet, 364 dense BF16 TFLOP/s (FP32 accumulate)",
        ),
        GpuKind(
            "RTX 4090", round(165 / 989, 2), 24,
            "vendor: NVIDIA Ada Lovelace whitepaper, 165 dense BF16 TFLOP/s (FP32 accumulate)",
        ),
    )
}  # fmt: skip


def gpu_kind(name: str) -> GpuKind | None:
    """The table's entry for `name`, ignoring case, spaces and dashes ("rtx-4090", "h100pcie")."""
    squash = "".join(c for c in name.lower() if c.isalnum())
    return next((g for g in GPU_KINDS.values() if "".join(c for c in g.name.lower() if c.isalnum()) == squash), None)


@dataclass(frozen=True)
class CostModel:
    """Estimated GPU seconds (and money) of a segment: the quantity the report, `status` and the Prefect
    artifacts measure (`tasks.records.GPU_SECONDS`), for a segment that needs one attempt.

    ``est_gpu_s = forwards_per_clip * (first_clip_s + (clips - 1) * later_clip_s)
    + clips * overhead_per_clip_s``

    ``forwards_per_clip`` counts DiT passes (batch rows): for exact sampling ``steps * cfg_passes``,
    ``cfg_passes`` being 2 because classifier-free guidance runs the DiT twice per denoising step
    (conditional and audio-zeroed unconditional). A speed preset (``speed``, model/presets.py) runs
    fewer: its steps and CFG truncation give the count before step caching, an upper bound; a
    calibration on the user's weights (tasks/calibrate.py) gives the count its caching actually
    ran (``measured_forwards``). ``overhead_per_clip_s`` covers encoders, VAE decode and motion
    re-encode (measured with the forwards); the measured figure also holds each clip's H.264 encode
    and state write (a few seconds a clip at 480p, in the worker while its GPU waits), which the GPU
    run of issue 14 sets against this estimate. The forward costs are keyed by (GPU type, resolution
    bucket); GPUs of the `GPU_KINDS` table without figures of their own scale the H100's by their
    relative speed. The bucket's real H×W follows the reference image's aspect but never exceeds
    the bucket's area, so the figures are an upper bound within a bucket.
    """

    gpu: str = "H100"
    cfg_passes: int = 2
    overhead_per_clip_s: float = DEFAULT_OVERHEAD_PER_CLIP_S
    forward_costs: dict[tuple[str, str], ForwardCost] = field(default_factory=lambda: dict(DEFAULT_FORWARD_COSTS))
    speed: SpeedConfig | None = None
    measured_forwards: float | None = None
    """DiT passes per clip the preset ran in a calibration (replaces the nominal count)."""
    price_per_gpu_hour: float | None = None
    mode: str = "exact"
    """'distilled': LiveAvatar's passes (4 steps x 4 blocks a 48-frame clip, no CFG) at their cost
    (construct with `cost_model(..., mode="distilled")`, which sets its forward and clip costs)."""

    def _scale(self) -> float | None:
        """H100 seconds -> seconds on this GPU (None for a GPU of unknown speed)."""
        kind = gpu_kind(self.gpu)
        return 1.0 / kind.relative_speed if kind is not None else None

    def forward_cost(self, resolution: Resolution | str) -> ForwardCost | None:
        key = Resolution(resolution).value
        own = self.forward_costs.get((self.gpu, key))
        scale = self._scale()
        h100 = self.forward_costs.get(("H100", key))
        if own is not None or h100 is None or scale is None:
            return own
        return ForwardCost(first_clip_s=h100.first_clip_s * scale, later_clip_s=h100.later_clip_s * scale)

    def forwards_per_clip(self, steps: int, guidance: float = 4.5) -> float:
        """DiT passes (batch rows) per clip for a row of ``steps`` steps."""
        if self.mode == "distilled":  # a pass is one block at one step
            return DISTILLED_STEPS * (DISTILLED_INFER_FRAMES // 12)
        if self.measured_forwards is not None:
            return self.measured_forwards
        passes = self.cfg_passes if guidance > 1.0 else 1
        if self.speed is None:
            return steps * passes
        steps = self.speed.sampling_steps(steps)
        if self.speed.exact:
            return steps * passes
        return self.speed.nominal_forwards(steps, guidance=guidance > 1.0)

    def estimate(self, clips: int, *, resolution: Resolution | str, steps: int, guidance: float = 4.5) -> float | None:
        """GPU seconds for ``clips`` clips of one segment; None for an unknown GPU/resolution."""
        cost = self.forward_cost(resolution)
        if cost is None or clips <= 0:
            return None if cost is None else 0.0
        overhead = self.overhead_per_clip_s * (self._scale() or 1.0)
        per_forward = cost.first_clip_s + (clips - 1) * cost.later_clip_s
        return round(self.forwards_per_clip(steps, guidance) * per_forward + clips * overhead, 3)

    def money(self, gpu_s: float | None) -> float | None:
        """What ``gpu_s`` GPU seconds cost at the configured price (None without a price)."""
        return gpu_money(gpu_s, self.price_per_gpu_hour)


def gpu_money(gpu_s: float | None, price_per_gpu_hour: float | None) -> float | None:
    """GPU seconds at a price per GPU-hour; None when either is unknown."""
    if gpu_s is None or price_per_gpu_hour is None:
        return None
    return round(gpu_s / 3600 * price_per_gpu_hour, 4)


def cost_model(
    gpu: str = "H100",
    *,
    price_per_gpu_hour: float | None = None,
    speed: SpeedConfig | None = None,
    preset: str = "exact",
    calibration: dict | None = None,
    mode: str = "exact",
) -> CostModel:
    """The cost model for a batch (or a row) in `preset` with `speed` (its resolved settings): DiT
    passes per clip from the calibration's measurement when it ran this preset with these
    settings, else the nominal count; in distilled `mode` LiveAvatar's passes and their cost.
    Raises ValueError for a GPU outside `GPU_KINDS`."""
    kind = gpu_kind(gpu)
    if kind is None:
        raise ValueError(f"GPU kind {gpu!r}: expected one of {', '.join(GPU_KINDS)}")
    if mode == "distilled":
        return CostModel(
            gpu=kind.name, overhead_per_clip_s=DISTILLED_OVERHEAD_PER_CLIP_S, price_per_gpu_hour=price_per_gpu_hour,
            forward_costs=dict(DISTILLED_FORWARD_COSTS), mode=mode,
        )  # fmt: skip
    measured = None
    entry = ((calibration or {}).get("presets") or {}).get(preset) or {}
    if speed is not None and entry.get("forwards_per_clip") and entry.get("speed") == speed.to_dict():
        measured = float(entry["forwards_per_clip"])
    return CostModel(gpu=kind.name, speed=speed, measured_forwards=measured, price_per_gpu_hour=price_per_gpu_hour)


# --------------------------------------------------------------------------- output


def plans_to_json(plans: Iterable[Plan], price_per_gpu_hour: float | None = None) -> dict:
    """The ``s2v-batch plan --json`` document: {"rows": [{"id", "est_gpu_s", "est_cost", "segments": [...]}],
    "est_gpu_s", "est_cost"}; the costs are None without a price per GPU-hour (or where a row's GPU
    time is unknown). Each row also carries "approximate", "fit_score" and "flags" (the alignment's
    evidence and the unsafe cuts)."""
    rows = []
    for p in plans:
        gpu = row_gpu_s(p)
        rows.append(
            {
                "id": p.row_id,
                "est_gpu_s": gpu,
                "est_cost": gpu_money(gpu, price_per_gpu_hour),
                "approximate": p.approximate,
                "fit_score": p.fit_score,
                "flags": p.flags,
                "segments": [
                    {
                        "start_s": s.start_s,
                        "end_s": s.end_s,
                        "frames": s.frames,
                        "clips": s.clips,
                        "seed": s.seed,
                        "est_gpu_s": s.est_gpu_s,
                    }
                    for s in p.segments
                ],
            }
        )
    known = [r["est_gpu_s"] for r in rows]
    total = None if any(g is None for g in known) else round(sum(known), 3)
    return {"rows": rows, "est_gpu_s": total, "est_cost": gpu_money(total, price_per_gpu_hour)}


def row_gpu_s(plan: Plan) -> float | None:
    """The row's estimated GPU seconds (None when a segment's is unknown)."""
    gpu = [s.est_gpu_s for s in plan.segments]
    return None if any(g is None for g in gpu) else round(sum(gpu), 3)
