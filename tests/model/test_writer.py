"""The random-checkpoint writer (model.tiny) and its bench CLIs, at tiny size on the CPU through the
code that writes the full size on a GPU; the compile cache a second worker reuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model import comfy, layout
from model.checkpoint import write_safetensors
from model.tiny import Sizes, estimate_bytes, write_tiny_checkpoint, write_tiny_comfyui

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


def test_streamed_safetensors_hold_every_dtype(tmp_path: Path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "u8": torch.arange(9, dtype=torch.uint8),
        "scalar": torch.tensor(0.25),
        "empty": torch.empty(0, dtype=torch.float8_e4m3fn),
    }
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    path = write_safetensors(tmp_path / "x.safetensors", entries, iter(tensors.values()), {"format": "pt"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    as_bytes = [(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)) for k, v in tensors.items()]
    assert all(back[k].dtype == v.dtype for k, v in tensors.items()) and all(torch.equal(*pair) for pair in as_bytes)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    # a tensor that is not what the header promised: no file under the name, the part file left behind
    with pytest.raises(ValueError, match=r"f32: expected torch.float32 \(7,\)"):
        write_safetensors(tmp_path / "y.safetensors", entries, iter([tensors["bf16"], tensors["bf16"]]))
    assert not (tmp_path / "y.safetensors").exists()


def _tensor_bytes(path: Path) -> int:
    """Bytes of the weights in a file (fp8 scales, markers and the embedded tokenizer not counted)."""
    state = torch.load(path, weights_only=True) if path.suffix == ".pth" else load_file(path)
    return sum(t.numel() * t.element_size() for k, t in state.items()
               if not comfy.is_marker(k) and not comfy.scale_target(k) and k != comfy.SPIECE_MODEL)  # fmt: skip


@pytest.mark.parametrize("fp8", [False, True])
def test_estimate_is_what_is_written(tmp_path: Path, fp8: bool):
    comfy_set = layout.resolve(write_tiny_comfyui(tmp_path / "comfy", fp8_scaled=fp8))
    official = layout.resolve(write_tiny_checkpoint(tmp_path / "official", max_shard_bytes=10**9))
    for name, files in (("comfyui", comfy_set), ("official", official)):
        want = estimate_bytes(Sizes.tiny(), name, fp8_scaled=fp8)
        got = {
            "dit": _tensor_bytes(files.dit if files.dit.is_file() else files.dit / layout.DIT_SINGLE),
            "text_encoder": _tensor_bytes(files.text_encoder),
            "vae": _tensor_bytes(files.vae),
            "audio_encoder": _tensor_bytes(files.audio_encoder if files.audio_encoder.is_file()
                                           else files.audio_encoder / "model.safetensors"),  # fmt: skip
        }
        assert got == want, name
    full = estimate_bytes(Sizes.full(), "official")
    assert 45e9 < sum(full.values()) < 47e9 and 32e9 < full["dit"] < 33e9  # the released files' sizes
    assert 24e9 < sum(estimate_bytes(Sizes.full(), "comfyui", fp8_scaled=True).values()) < 28e9


def test_a_seed_writes_the_same_files(tmp_path: Path):
    a, b = write_tiny_comfyui(tmp_path / "a", seed=4), write_tiny_comfyui(tmp_path / "b", seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(files) == 4 and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = write_tiny_comfyui(tmp_path / "c", seed=5)
    assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes()


def test_write_checkpoint_cli(tmp_path: Path):
    import write_checkpoint

    out = tmp_path / "ckpt"
    summary = write_checkpoint.main([str(out), "--layout", "comfyui", "--fp8-scaled", "--tiny"])
    assert summary["files"] == 4 and summary["bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert layout.resolve(out).dit_fp8
    with pytest.raises(SystemExit, match="is not empty"):
        write_checkpoint.main([str(out), "--layout", "official", "--tiny"])
    other = tmp_path / "official"
    write_checkpoint.main([str(other), "--layout", "official", "--tiny", "--remove", str(out)])
    assert not out.exists() and not layout.resolve(other).dit_fp8
    write_checkpoint.main([str(other), "--layout", "comfyui", "--tiny", "--replace", "--flat"])
    assert layout.resolve(other).dit.name == layout.COMFY_DIT_BF16
    estimate = write_checkpoint.main([str(tmp_path / "full"), "--layout", "official", "--dry-run"])
    assert sum(estimate["estimate_bytes"].values()) > 45e9 and not any((tmp_path / "full").iterdir())


def test_cold_start_bench_on_the_cpu(tmp_path: Path):
    """bench/cold_start.py --tiny in fresh processes (eager here; the compile cache is tested below)."""
    import cold_start

    (run,) = cold_start.main(["--tiny", "--no-compile", "--runs", "1"])
    assert run["device"] == "cpu" and run["precision"] == "bf16" and run["size"] == "64x64x8"
    assert {"check_s", "read_s", "build_s", "to_device_s", "total_s"} <= run["load"].keys()
    assert set(run["load"]["components"]) == {"dit", "text_encoder", "audio_encoder", "vae", "setup"}
    assert 0 < run["process_s"] < run["ready_s"] and run["first_step_s"] > 0 and run["step_s"] > 0


_COMPILE = """
import json, sys, torch
from torch._dynamo.utils import counters
from model.pipeline import enable_compile_cache
enable_compile_cache(sys.argv[1])
f = torch.compile(lambda x: torch.nn.functional.gelu(x * 3 + 1).sum(-1))
f(torch.randn(8, 16))
print(json.dumps(dict(counters["inductor"])))
"""


def test_a_second_process_reuses_compiled_kernels(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path / "cache")], capture_output=True,
                              text=True, check=True, env=env)  # fmt: skip
        return json.loads(done.stdout.splitlines()[-1])

    first, second = run(), run()
    assert first.get("fxgraph_cache_miss") == 1 and not first.get("fxgraph_cache_hit")
    assert second.get("fxgraph_cache_hit") == 1 and not second.get("fxgraph_cache_miss")
    assert any((tmp_path / "cache").iterdir())
