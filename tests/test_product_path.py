"""The product path with a real checkpoint: `s2v-batch run --checkpoint <tiny official folder>` as a
subprocess, through the Prefect flow, in the flow process and on a Ray pool of declared GPUs, to MP4s
with sound; the report, the work folder left without states, and a resume after the workers die.

The command runs through tests/cli_small_frames.py (64x64 frames, so the tiny model renders a clip in
seconds on a CPU); everything else is the product's own code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from media import speech, video_with_sound
from test_batch_flow import check_video, ffprobe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "Wan2.2-S2V-14B", seed=0)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Speech of ~2 s and ~4 s (espeak-ng), a pose video, and the example portrait."""
    folder = tmp_path_factory.mktemp("media")
    speech(folder / "hello.wav", "Hello there, and welcome.")
    speech(folder / "course.wav", "Thank you for joining this course. See you in the next lesson.")
    video_with_sound(folder / "hello.wav", folder / "pose.mp4")
    (folder / "face.jpg").write_bytes((ROOT / "manifests/examples/media/astronaut.jpg").read_bytes())
    return folder


def write_manifest(folder: Path, rows: list[str]) -> Path:
    path = folder / "batch.csv"
    path.write_text("\n".join(["id,audio,image,pose_video,steps,seed", *rows]) + "\n")
    return path


def s2v_run(manifest: Path, out: Path, prefect_api: str, *options: str) -> subprocess.Popen:
    """The command in its own session (so the Ray it starts can be found and stopped with it)."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "cli_small_frames", "run", str(manifest), "--out", str(out), *options]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind in the command's session
    assert proc.returncode == 0, (stdout + stderr)[-4000:]
    return stdout


def check_outputs(out: Path, report: dict) -> None:
    """Every row succeeded into an MP4 with sound as long as its audio, and no state is left anywhere."""
    assert report["backend"] == "wan-s2v"
    for row in report["rows"]:
        assert row["status"] == "succeeded", row
        video = out / row["video"]
        check_video(video)
        info = ffprobe(video)
        assert any(s["codec_type"] == "audio" for s in info["streams"])
        assert abs(float(info["format"]["duration"]) - row["duration_s"]) <= 2 / 16 + 0.05, row
        assert row["gpu_s"] > 0 and row["clips"] >= 1
    work = out / ".s2v" / "work"
    assert list(work.glob("*/seg_*/clip_*.mp4")) and not list(work.glob("**/*.state.*"))


def test_cli_with_a_checkpoint_on_a_cpu_device_renders_in_the_flow_process(
    prefect_api, checkpoint: Path, media: Path, tmp_path: Path
) -> None:
    manifest = write_manifest(media, [
        f"hello,{media}/hello.wav,{media}/face.jpg,,2,7",
        f"posed,{media}/hello.wav,{media}/face.jpg,{media}/pose.mp4,1,8",
    ])  # fmt: skip
    out = tmp_path / "out"
    # pool=auto would start a GPU pool for wan-s2v; with --device cpu the flow process renders.
    stdout = finish(s2v_run(manifest, out, prefect_api, "--checkpoint", str(checkpoint), "--device", "cpu",
                            "--infer-frames", "48"))
    report = json.loads((out / "report.json").read_text())
    assert "2 succeeded" in stdout
    check_outputs(out, report)
    for row in report["rows"]:
        assert row["workers"] == [] and row["attempts"] == 1 and row["clips"] == 1


def _workers(session: int) -> list[int]:
    """Process ids of the pool's workers started by the command whose session id is `session` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):  # gone while listing, or not a process
            pid = int(entry.name)
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"ray::GeneratorWorker" in title and os.getsid(pid) == session:
                found.append(pid)
    return found


def test_cli_on_the_pool_resumes_after_its_workers_are_killed(
    prefect_api, checkpoint: Path, media: Path, tmp_path: Path
) -> None:
    manifest = write_manifest(media, [
        f"course,{media}/course.wav,{media}/face.jpg,,1,7",
        f"hello,{media}/hello.wav,{media}/face.jpg,,1,9",
    ])  # fmt: skip
    out = tmp_path / "out"
    proc = s2v_run(manifest, out, prefect_api, "--checkpoint", str(checkpoint), "--device", "cpu",
                   "--pool", "on", "--pool-workers", "2", "--infer-frames", "32", "--retry-backoff-s", "0.1")
    first = out / ".s2v" / "work" / "course" / "seg_000" / "clip_0000.mp4"
    try:
        deadline = time.monotonic() + 600
        while not first.exists():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "no clip rendered in time"
            time.sleep(0.2)
        kept = (first.stat().st_ino, first.stat().st_mtime_ns)
        # The state to continue from is on disk; then every worker dies (as on a lost node).
        assert list(first.parent.glob("clip_0000.state.*"))
        workers = _workers(proc.pid)
        assert workers, "no pool worker found in the command's session"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    finish(proc)
    report = json.loads((out / "report.json").read_text())
    check_outputs(out, report)
    course = next(r for r in report["rows"] if r["id"] == "course")
    assert course["clips"] >= 2 and course["clips_reused"] >= 1 and course["attempts"] >= 2
    assert course["workers"] and all("pid" in w for w in course["workers"])
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept  # the finished clip was reused, not redone


def test_pool_auto_needs_a_gpu_device() -> None:
    from flows.pool_run import use_pool
    from flows.settings import BatchSettings

    assert use_pool(BatchSettings(checkpoint="x"), "wan-s2v")  # the model on the GPUs of a pool by default
    assert use_pool(BatchSettings(checkpoint="x", device="cuda:0"), "wan-s2v")
    assert not use_pool(BatchSettings(checkpoint="x", device="cpu"), "wan-s2v")  # no GPU pool for a CPU device
    assert use_pool(BatchSettings(checkpoint="x", device="cpu", pool="on"), "wan-s2v")  # unless asked for
    assert not use_pool(BatchSettings(checkpoint="x", pool="off"), "wan-s2v")


@pytest.fixture(scope="module")
def comfy_folder(tmp_path_factory) -> Path:
    """ComfyUI's model folders with the guide's four files (fp8-scaled DiT and umT5, bf16 VAE, fp16 wav2vec2)."""
    from model.tiny import write_tiny_comfyui

    return write_tiny_comfyui(tmp_path_factory.mktemp("comfy") / "models", seed=0, fp8_scaled=True)


def test_cli_on_a_comfyui_folder_renders_on_the_pool(
    prefect_api, comfy_folder: Path, media: Path, tmp_path: Path
) -> None:
    assert {p.parent.name for p in comfy_folder.rglob("*.safetensors")} == {
        "diffusion_models", "text_encoders", "vae", "audio_encoders"}
    manifest = write_manifest(media, [f"hello,{media}/hello.wav,{media}/face.jpg,,1,7"])
    out = tmp_path / "out"
    # bf16 (the default precision): the fp8-scaled files are expanded, so a CPU renders them.
    finish(s2v_run(manifest, out, prefect_api, "--checkpoint", str(comfy_folder), "--device", "cpu",
                   "--pool", "on", "--pool-workers", "1", "--infer-frames", "32"))
    report = json.loads((out / "report.json").read_text())
    check_outputs(out, report)
    (row,) = report["rows"]
    assert row["workers"] and row["attempts"] == 1


def test_a_model_that_cannot_load_on_the_pool_fails_before_generating_with_its_cause(
    prefect_api, comfy_folder: Path, media: Path, tmp_path: Path
) -> None:
    manifest = write_manifest(media, [f"hello,{media}/hello.wav,{media}/face.jpg,,1,7"])
    out = tmp_path / "out"
    proc = s2v_run(manifest, out, prefect_api, "--checkpoint", str(comfy_folder), "--device", "cpu",
                   "--pool", "on", "--pool-workers", "1", "--precision", "fp8")
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, stdout + stderr
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert "no worker could start" in line and "fp8" in line and "pool=off" not in line
    assert not list(out.glob("*.mp4")) and not list(out.glob(".s2v/work/*/seg_*/clip_*.mp4"))
