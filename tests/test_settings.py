"""Settings: defaults < config file < S2V_* environment < command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.settings import SettingsError, load_settings


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "s2v.toml"
    config.write_text('max_concurrent_rows = 3\npad_s = 0.5\nlanguage_policy = "skip"\n')
    monkeypatch.setenv("S2V_PAD_S", "0.1")
    monkeypatch.setenv("S2V_ALLOWED_ROOTS", '["s3://team/media"]')
    settings = load_settings(config, language_policy="fail", max_segment_s=None)
    assert settings.max_concurrent_rows == 3          # from the file
    assert settings.pad_s == 0.1                      # environment beats the file
    assert settings.language_policy == "fail"         # command line beats both
    assert settings.max_segment_s == 60.0             # None means "not given": the default stays
    assert settings.allowed_roots == ["s3://team/media"]


def test_config_from_environment_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "other.toml"
    config.write_text("max_concurrent_rows = 0\n")
    monkeypatch.setenv("S2V_CONFIG", str(config))
    with pytest.raises(SettingsError, match="max_concurrent_rows") as info:
        load_settings()
    assert str(config) in str(info.value)
    monkeypatch.setenv("S2V_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match="does not exist .set by S2V_CONFIG"):
        load_settings()


def test_config_command_prints_effective_settings(tmp_path: Path) -> None:
    config = tmp_path / "s2v.toml"
    config.write_text('backend = "preview"\nmax_concurrent_rows = 4\n')
    result = subprocess.run([sys.executable, "-m", "flows", "config", "--config", str(config)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_concurrent_rows" in result.stdout and "S2V_MAX_CONCURRENT_ROWS" in result.stdout
    assert f"config file: {config}" in result.stdout.replace("\n", "")
