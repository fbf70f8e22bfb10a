"""Manifest reading and validation: one pass, every problem named by row, column and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.manifest import ManifestError, read_manifest, validate_manifest
from tasks.records import Resolution


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_examples_are_valid(examples: Path) -> None:
    result = validate_manifest(str(examples / "batch.csv"))
    assert result.issues == []
    assert [r.id for r in result.rows] == ["welcome", "safety", "thanks"]
    first = result.rows[0]
    assert first.row == 1
    assert first.audio == str(examples / "media" / "welcome.wav")  # resolved against the manifest folder
    assert first.resolution is Resolution.P480
    assert first.seed == 7 and first.steps == 40 and first.guidance == 4.5
    assert first.output == "welcome.mp4"


def test_every_problem_reported_in_one_pass(examples: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(b"RIFF")
    manifest = write(examples / "bad.csv", "\n".join([
        "id,audio,image,resolution,seed,steps,guidance,language,output",
        "ok,media/welcome.wav,media/astronaut.jpg,720p,1,20,5,en,",
        ",media/welcome.wav,media/astronaut.jpg,,,,,,",                   # 2: empty id
        "ok,media/safety.mp3,media/astronaut.jpg,,,,,,other.mp4",         # 3: duplicate id
        "r4,media/missing.wav,media/astronaut.jpg,1080p,-1,0,x,english,",  # 4: five problems
        "r5,../elsewhere.wav,media/astronaut.jpg,,,,,,",                   # 5: escapes the folder
        f"r6,{outside},media/astronaut.jpg,,,,,,",                         # 6: absolute path outside
        "r7,media/welcome.wav,media/astronaut.jpg,,,,,,../x.mp4",          # 7: output escapes
        "r8,media/welcome.wav,,,,,,,",                                     # 8: empty image
    ]))
    result = validate_manifest(str(manifest))
    assert [r.id for r in result.rows] == ["ok"]
    assert result.rows[0].resolution is Resolution.P720
    by_row = {row: sorted(i.field for i in issues) for row, issues in result.issues_by_row().items()}
    assert by_row == {
        2: ["id"],
        3: ["id"],
        4: ["audio", "guidance", "language", "resolution", "seed", "steps"],
        5: ["audio"],
        6: ["audio"],
        7: ["output"],
        8: ["image"],
    }
    messages = {i.row: str(i) for i in result.issues}
    assert messages[3] == "row 3 (id 'ok'), column 'id': duplicate id, already used by row 1"
    row4 = {i.field: i.reason for i in result.issues if i.row == 4}
    assert row4["resolution"] == "unknown resolution '1080p'; use 480p or 720p"
    assert row4["audio"].startswith("file not found:")
    assert "outside the allowed folders" in messages[5]
    assert "outside the allowed folders" in messages[6]


def test_missing_files_fail_their_row_only(examples: Path) -> None:
    manifest = write(examples / "m.csv", "id,audio,image\n"
                     "a,media/welcome.wav,media/astronaut.jpg\n"
                     "b,media/nope.wav,media/astronaut.jpg\n")
    result = validate_manifest(str(manifest))
    assert [r.id for r in result.rows] == ["a"]
    (issue,) = result.issues
    assert (issue.row, issue.field) == (2, "audio")
    assert issue.reason.startswith("file not found: ") and issue.reason.endswith("nope.wav")


def test_allowed_roots_admit_other_folders(examples: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "voice.wav").write_bytes((examples / "media" / "welcome.wav").read_bytes())
    manifest = write(examples / "m.csv", f"id,audio,image\na,{shared / 'voice.wav'},media/astronaut.jpg\n")
    assert validate_manifest(str(manifest)).issues[0].field == "audio"
    result = validate_manifest(str(manifest), allowed_roots=[str(shared)])
    assert result.issues == [] and result.rows[0].audio == str(shared / "voice.wav")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a CSV file"),
        (b"name,path\nx,y\n", "lacks required column(s) id, audio, image"),
        (b"id,audio,image\n", "no data rows"),
        (b"id,audio,image\n\"unterminated,a,b\n", "not a valid CSV"),
        (b"id,audio\xff,image\n", "not a UTF-8 CSV"),
    ],
)
def test_unusable_manifest_stops_with_one_message(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest not found"):
        validate_manifest(str(tmp_path / "none.csv"))


def test_s3_manifest_through_a_real_s3_server(s3) -> None:
    result = validate_manifest("s3://s2v-examples/batch.csv")
    assert result.issues == []
    assert result.rows[0].audio == "s3://s2v-examples/media/welcome.wav"
    s3.rm("s2v-examples/media/thanks.flac")
    try:
        result = validate_manifest("s3://s2v-examples/batch.csv")
        (issue,) = result.issues
        assert (issue.row, issue.field) == (3, "audio")
        assert "s3://s2v-examples/media/thanks.flac" in issue.reason
    finally:
        s3.put_file(str(Path(__file__).parents[1] / "manifests/examples/media/thanks.flac"),
                    "s2v-examples/media/thanks.flac")


def test_s3_relative_paths_and_escapes(s3) -> None:
    s3.pipe_file("s2v-examples/rel/m.csv",
                 b"id,audio,image\na,../media/welcome.wav,../media/astronaut.jpg\n"
                 b"b,s3://other-bucket/x.wav,../media/astronaut.jpg\n")
    result = validate_manifest("s3://s2v-examples/rel/m.csv", allowed_roots=["s3://s2v-examples/media"])
    assert [r.audio for r in result.rows] == ["s3://s2v-examples/media/welcome.wav"]
    (issue,) = result.issues
    assert issue.row == 2 and issue.field == "audio" and "outside the allowed folders" in issue.reason


def test_template_variables_fill_from_the_row(examples: Path) -> None:
    manifest = write(examples / "t.csv", "\n".join([
        "id,audio,image,name,course,script,prompt,webhook",
        "a,media/welcome.wav,media/astronaut.jpg,Ana,Safety 101,"
        "\"Hello {{name}}, welcome to {{ course }}.\",\"{{name}} smiling\",https://hooks.example/row",
        "b,media/welcome.wav,media/astronaut.jpg,Bo,,\"Hi {{nme}} and {{ team }}\",,ftp://x",
    ]) + "\n")
    result = validate_manifest(str(manifest))
    (row,) = result.rows
    assert row.script == "Hello Ana, welcome to Safety 101."
    assert row.prompt == "Ana smiling" and row.webhook == "https://hooks.example/row"
    issues = {i.field: i.reason for i in result.issues}
    assert issues["script"].startswith("unknown template variable {{nme}}, {{team}}")
    assert "not an http(s) URL" in issues["webhook"]
    assert result.ignored_columns == ["name", "course"]


def test_preset_and_lora_columns(examples: Path) -> None:
    (examples / "media" / "style.safetensors").write_bytes(b"lora")
    (examples / "media" / "eyes.safetensors").write_bytes(b"lora")
    manifest = write(examples / "speed.csv", "\n".join([
        "id,audio,image,preset,lora,lora_strength",
        "a,media/welcome.wav,media/astronaut.jpg,Fast,media/style.safetensors;media/eyes.safetensors,0.5;1",
        "b,media/welcome.wav,media/astronaut.jpg,,none,",
        "c,media/welcome.wav,media/astronaut.jpg,,,",
        "d,media/welcome.wav,media/astronaut.jpg,turbo,media/style.safetensors,0.5;0.7",
        "e,media/welcome.wav,media/astronaut.jpg,exact,media/gone.safetensors,x",
        "f,media/welcome.wav,media/astronaut.jpg,,../outside.safetensors,",
    ]) + "\n")  # fmt: skip
    result = validate_manifest(str(manifest))
    rows = {r.id: r for r in result.rows}
    media = examples / "media"
    assert rows["a"].preset == "fast" and rows["a"].lora == [str(media / "style.safetensors"),
                                                              str(media / "eyes.safetensors")]  # fmt: skip
    assert rows["a"].lora_strength == [0.5, 1.0]
    assert rows["b"].lora == [] and rows["b"].preset is None  # 'none': without the batch's LoRAs
    assert rows["c"].lora is None and rows["c"].lora_strength is None  # empty: the batch's settings
    lines = [str(i) for i in result.issues]
    assert lines == [
        "row 4 (id 'd'), column 'lora_strength': 2 strengths for 1 LoRAs: give one, or one per LoRA",
        "row 4 (id 'd'), column 'preset': unknown preset 'turbo'; use exact, balanced, fast",
        "row 5 (id 'e'), column 'lora': file not found: " + str(media / "gone.safetensors"),
        "row 5 (id 'e'), column 'lora_strength': 'x' is not a number from -10 to 10 (or one per LoRA, separated "
        "by ';')",
        "row 6 (id 'f'), column 'lora': path '../outside.safetensors' resolves outside the allowed folders "
        f"({examples})",
    ]
