"""Planning speed: 10,000 rows planned from cached alignments.

Each row's alignment is cached as JSON (as the flow's speech step stores it); the
benchmark times reading and validating those caches, planning every row, and building
the JSON document and the summary table, as ``s2v-batch plan`` does after manifest
validation. Rows are 15 s to 5 min of synthetic speech (0.15-0.6 s words, 0-0.8 s pauses).

Usage:
    .venv/bin/python bench/plan_speed.py [--rows 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.views import plan_summary_table  # noqa: E402
from tasks.cost import plans_to_json  # noqa: E402
from tasks.plan import plan_row  # noqa: E402
from tasks.records import SpeechAnalysis, WordTiming  # noqa: E402

SR = 16_000


def synthetic_analysis(rng: np.random.Generator, seconds: float) -> SpeechAnalysis:
    n = int(seconds / 0.3) + 1
    lengths = rng.uniform(0.15, 0.6, n)
    gaps = np.where(rng.random(n) < 0.15, rng.uniform(0.2, 0.8, n), rng.uniform(0.0, 0.08, n))
    starts = 0.2 + np.concatenate([[0.0], np.cumsum(lengths + gaps)[:-1]])
    keep = starts + lengths < seconds
    words = [
        WordTiming(word="w", start=round(float(s), 3), end=round(float(s + d), 3), score=0.5)
        for s, d in zip(starts[keep], lengths[keep], strict=True)
    ]
    return SpeechAnalysis(aligner="synthetic", approximate=False, words=words, fit_score=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        durations = rng.uniform(15, 300, args.rows)
        for i, seconds in enumerate(durations):
            analysis = synthetic_analysis(rng, float(seconds))
            (root / f"{i}.json").write_text(json.dumps({"key": "k", "analysis": analysis.model_dump(mode="json")}))
        t0 = time.perf_counter()
        plans = []
        for i, seconds in enumerate(durations):
            data = json.loads((root / f"{i}.json").read_text())
            analysis = SpeechAnalysis.model_validate(data["analysis"])
            words = None if analysis.approximate else analysis.words
            plans.append(plan_row(f"row{i}", int(seconds * SR), words, seed=i, width=832, height=480))
        t_plan = time.perf_counter() - t0
        doc = plans_to_json(plans)
        json.dumps(doc)
        Console(file=open(os.devnull, "w"), width=120).print(plan_summary_table(plans))  # noqa: SIM115
        total = time.perf_counter() - t0
    segments = sum(len(p.segments) for p in plans)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "audio_hours": round(float(durations.sum()) / 3600, 1),
                "segments": segments,
                "read_validate_plan_s": round(t_plan, 2),
                "with_json_and_table_s": round(total, 2),
                "per_row_ms": round(total / args.rows * 1000, 3),
                "python": platform.python_version(),
                "cpu": platform.processor() or platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
