"""The command line as an operator meets it, run as a subprocess: usage errors read as usage errors,
help a person reads, settings that cannot work stop the command before anything starts, and a run's
warnings and exit code tell the truth about the batch."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from pathlib import Path

import pytest
from media import mixed_manifest
from test_cli import s2v


def closed_api() -> dict[str, str]:
    """PREFECT_API_URL of a port nobody listens on: a command that reaches for the API fails there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return {"PREFECT_API_URL": f"http://127.0.0.1:{s.getsockname()[1]}/api"}


def usage_error(result, *words: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Usage:" in output and "Traceback" not in output and "could not run" not in output, output
    for word in words:
        assert word in output, output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), ("Commands",)),  # no arguments: the usage and the commands, not "NoArgsIsHelpError"
        (("bogus",), ("No such command 'bogus'",)),
        (("validate",), ("Missing argument 'MANIFEST'",)),
        (("run", "m.csv"), ("Missing option '--out'",)),
        (("plan", "m.csv", "--language-policy", "maybe"), ("--language-policy", "'maybe' is not one of")),
        (("plan", "m.csv", "--mismatch-policy", "never"), ("--mismatch-policy", "'never' is not one of")),
        (("run", "m.csv", "--out", "o", "--backend", "gpu"), ("--backend", "'gpu'")),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(args: tuple[str, ...], words: tuple[str, ...]) -> None:
    usage_error(s2v(*args, env=closed_api()), *words)


def test_help_names_values_a_person_reads() -> None:
    result = s2v("run", "--help")
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout and "BOOLEAN" not in result.stdout
    for shown in ("FOLDER|URI", "<auto|preview|wan-s2v>", "<warn|skip|fail>", "SECONDS", "--no-offload"):
        assert shown in result.stdout, shown


def test_contradicting_settings_fail_at_load_in_one_line(examples: Path, tmp_path: Path) -> None:
    for command in ("validate", "plan", "run"):
        args = [command, str(examples / "batch.csv"), "--max-segment-s", "2"]
        result = s2v(*args, *(["--out", str(tmp_path / "o")] if command == "run" else []), env=closed_api())
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: invalid settings:") and "min_segment_s" in line and "max_segment_s" in line
        assert not (tmp_path / "o").exists()


def test_missing_checkpoint_stops_before_the_prefect_api(examples: Path, tmp_path: Path) -> None:
    # The API is closed: reaching for it would say so. The checkpoint is named first, in one line.
    result = s2v("run", str(examples / "batch.csv"), "--out", str(tmp_path / "o"), "--checkpoint",
                 str(tmp_path / "absent"), env=closed_api())
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'absent'} (setting checkpoint, " \
                                    "S2V_CHECKPOINT)"
    assert not (tmp_path / "o").exists()


def test_validate_and_plan_read_the_settings_run_reads(examples: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(examples / "media", elsewhere)
    manifest = examples / "outside.csv"
    manifest.write_text(f"id,audio,image\nx,{elsewhere}/welcome.wav,{elsewhere}/astronaut.jpg\n")
    work = {"S2V_WORK_DIR": str(tmp_path / "work")}
    for command in ("validate", "plan"):
        refused = s2v(command, str(manifest), env=work)
        assert "outside the allowed folders" in refused.stdout + refused.stderr, command
        allowed = s2v(command, str(manifest), env={**work, "S2V_ALLOWED_ROOTS": str(elsewhere)})
        assert allowed.returncode == 0 and "outside" not in allowed.stdout, allowed.stdout + allowed.stderr
    config = tmp_path / "s2v.toml"
    config.write_text(f'allowed_roots = ["{elsewhere}"]\nmax_segment_s = 2\n')
    for command in ("validate", "plan"):  # the config file is read: its contradiction is refused
        result = s2v(command, str(manifest), "--config", str(config), env=work)
        assert result.returncode == 2 and "min_segment_s" in result.stderr, result.stderr


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    return mixed_manifest(tmp_path / "mixed")


def test_plan_shows_warnings_and_why_rows_are_skipped(mixed: Path, tmp_path: Path) -> None:
    result = s2v("plan", str(mixed), env={"S2V_WORK_DIR": str(tmp_path / "work")})
    assert result.returncode == 0, result.stderr
    assert "noface ⚠2" in result.stdout
    assert "warning noface: image_no_face: no frontal face found" in result.stdout
    assert "row 3 (id 'wrongfile'), skipped by mismatch_policy 'skip': audio_not_english_or_wrong_file" \
        in result.stdout
    assert "row 4 (id 'missing')" in result.stdout and "file not found" in result.stdout
    # With the mismatch policy at warn the wrong file is planned, its mismatch a warning.
    warned = s2v("plan", str(mixed), "--mismatch-policy", "warn", env={"S2V_WORK_DIR": str(tmp_path / "work")})
    assert re.search(r"│ wrongfile .*⚠5", warned.stdout), warned.stdout  # planned, with its 5 warnings
    assert "warning wrongfile: audio_not_english_or_wrong_file" in warned.stdout


@pytest.mark.slow
def test_run_shows_warnings_and_exits_1_for_a_partial_batch(prefect_api: str, mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = s2v("run", str(mixed), "--out", str(out), env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]  # Partial: some rows failed
    assert "Partial: 2 succeeded (1 with warnings), 1 failed, 1 skipped of 4 rows" in result.stdout
    assert "succeeded, 2 warnings" in result.stdout and "row 2 (noface): image_no_face" in result.stdout
    assert "file not found" in result.stdout
    assert "skipped by mismatch_policy 'skip'" in result.stdout
    assert (out / "welcome.mp4").exists() and (out / "noface.mp4").exists() and not (out / "wrongfile.mp4").exists()


@pytest.mark.slow
def test_run_where_every_row_failed_is_failed_and_exits_3(prefect_api: str, examples: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    manifest = examples / "gone.csv"
    manifest.write_text("id,audio,image\na,media/gone.wav,media/astronaut.jpg\nb,media/welcome.wav,media/gone.png\n")
    result = s2v("run", str(manifest), "--out", str(tmp_path / "out"), env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert "Failed: 0 succeeded, 2 failed" in result.stdout, result.stdout

    async def batch_run():
        async with get_client() as client:
            (run,) = [r for r in await client.read_flow_runs() if r.name.startswith("gone ")]
            return run

    run = asyncio.run(batch_run())
    assert run.state.type.value == "FAILED" and run.state.name == "Failed", run.state
