"""Manifest reading and validation: one pass, every problem named by row, column and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.manifest import validate_manifest
from tasks.manifest_read import ManifestError, read_manifest
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


# ---------------------------------------------------------------- hostile paths and shapes (issue 16)


def test_paths_the_os_refuses_fail_their_row_only(examples: Path) -> None:
    long_name = "a" * 300 + ".wav"  # over NAME_MAX (255) of every common file system
    long_path = "media/" + "b" * 5000 + "/x.wav"  # over PATH_MAX
    manifest = write(examples / "m.csv", "id,audio,image,lora\n"
                     "good,media/welcome.wav,media/astronaut.jpg,\n"
                     f"name,{long_name},media/astronaut.jpg,\n"
                     f"path,{long_path},media/astronaut.jpg,\n"
                     f"lora,media/welcome.wav,media/astronaut.jpg,{long_name}\n")
    result = validate_manifest(str(manifest))
    assert [r.id for r in result.rows] == ["good"]
    reasons = {(i.row, i.field): i.reason for i in result.issues}
    assert set(reasons) == {(2, "audio"), (3, "audio"), (4, "lora")}
    for reason in reasons.values():
        assert "the name is too long for the file system" in reason
        assert len(reason) < 300  # the path is shortened, not printed in full


def test_s3_rows_without_credentials_fail_their_rows_only(s3_endpoint: str, examples: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # No credentials anywhere: environment, files or instance metadata (the real lookup, not a fake client).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    manifest = write(examples / "m.csv", "id,audio,image\n"
                     "good,media/welcome.wav,media/astronaut.jpg\n"
                     "remote,s3://s2v-examples/media/welcome.wav,media/astronaut.jpg\n")
    try:
        result = validate_manifest(str(manifest), allowed_roots=["s3://s2v-examples"])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert [r.id for r in result.rows] == ["good"]
    (issue,) = result.issues
    assert (issue.row, issue.field) == (2, "audio")
    assert "S3 credentials are missing or wrong" in issue.reason


def test_nul_bytes_past_the_first_kilobytes_fail_their_cells(examples: Path) -> None:
    text = ("id,audio,image,script\n"
            f"long,media/welcome.wav,media/astronaut.jpg,{'word ' * 1500}\n"
            "nul,media/wel\x00come.wav,media/astronaut.jpg,fine\n"
            "script,media/welcome.wav,media/astronaut.jpg,bro\x00ken\n")
    manifest = examples / "m.csv"
    manifest.write_bytes(text.encode())
    result = validate_manifest(str(manifest))
    assert [r.id for r in result.rows] == ["long"]
    assert {(i.row, i.field) for i in result.issues} == {(2, "audio"), (3, "script")}
    assert all("NUL byte" in i.reason for i in result.issues)


def test_every_row_one_field_longer_than_the_header_is_refused(tmp_path: Path) -> None:
    # pandas would take the first column as the index and shift every value one column left.
    path = write(tmp_path / "m.csv", "id,audio,image\n"
                 "a,media/welcome.wav,media/astronaut.jpg,extra\n"
                 "b,media/welcome.wav,media/astronaut.jpg,extra\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    message = str(info.value)
    assert "line 2 has 4 fields but the header has 3 columns" in message and "\n" not in message


def test_one_long_row_in_the_middle_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", 'id,audio,image,script\n'
                 'a,x.wav,y.jpg,"two\nlines"\n'
                 'b,x.wav,y.jpg,unquoted, comma\n')
    with pytest.raises(ManifestError, match="line 4 has 5 fields but the header has 4 columns"):
        read_manifest(str(path))


def test_rows_with_fewer_fields_read_as_empty_cells(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,audio,image,script\na,x.wav,y.jpg\n")
    assert read_manifest(str(path)).to_dict(orient="records") == [
        {"id": "a", "audio": "x.wav", "image": "y.jpg", "script": ""}]


@pytest.mark.parametrize("header", ["id,audio,image,script,script", "id,audio,image,Script,script "])
def test_a_repeated_header_column_is_flagged(tmp_path: Path, header: str) -> None:
    path = write(tmp_path / "m.csv", f"{header}\na,x.wav,y.jpg,one,two\n")
    with pytest.raises(ManifestError, match=r"duplicate column\(s\): script"):
        read_manifest(str(path))


def test_a_fifo_or_folder_as_manifest_is_named_and_never_read(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "m.csv"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    with pytest.raises(ManifestError, match=r"is a FIFO \(named pipe\), not a CSV file"):
        validate_manifest(str(fifo))
    with pytest.raises(ManifestError, match="is a folder, not a CSV file"):
        validate_manifest(str(tmp_path))


def test_folders_and_fifos_in_rows_are_named_as_such(examples: Path) -> None:
    import os

    (examples / "media" / "voices").mkdir()
    os.mkfifo(examples / "media" / "pipe.wav")
    manifest = write(examples / "m.csv", "id,audio,image\n"
                     "dir,media/voices,media/astronaut.jpg\n"
                     "fifo,media/pipe.wav,media/astronaut.jpg\n")
    reasons = {i.row: i.reason for i in validate_manifest(str(manifest)).issues}
    assert reasons[1].endswith("voices is a folder, not a file")
    assert reasons[2].endswith("pipe.wav is a FIFO (named pipe), not a file")


def test_file_urls_resolve_against_the_manifest_folder(examples: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    manifest = write(examples / "m.csv", "id,audio,image\n"
                     "rel,file://media/welcome.wav,media/astronaut.jpg\n"
                     f"abs,file://{examples / 'media' / 'safety.mp3'},media/astronaut.jpg\n")
    result = validate_manifest(str(manifest))
    assert result.issues == []
    assert [r.audio for r in result.rows] == [str(examples / "media" / "welcome.wav"),
                                             str(examples / "media" / "safety.mp3")]


@pytest.mark.parametrize("output", [".s2v/rows/x.mp4", ".S2V/x.mp4", "./.s2v/work/a.mp4"])
def test_outputs_may_not_point_into_the_batch_records(examples: Path, output: str) -> None:
    manifest = write(examples / "m.csv", f"id,audio,image,output\na,media/welcome.wav,media/astronaut.jpg,{output}\n")
    (issue,) = validate_manifest(str(manifest)).issues
    assert issue.field == "output" and "points into .s2v/" in issue.reason
