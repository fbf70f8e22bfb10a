"""Loading and writing the S2V transformer's weights.

Two layouts are read (auto-detected, see model/README.md for the key mapping):

- official (`Wan-AI/Wan2.2-S2V-14B`): a folder with `config.json` and either
  `diffusion_pytorch_model.safetensors.index.json` + the shards it names, or one
  `diffusion_pytorch_model.safetensors`; keys equal our `state_dict()` keys;
- ComfyUI repackaged single files (`wan2.2_s2v_14B_bf16.safetensors`,
  `wan2.2_s2v_14B_fp8_scaled.safetensors`): the same keys, optionally under the prefix
  `model.diffusion_model.`; the fp8 file stores linear weights as float8_e4m3fn with a float32
  per-tensor scale (model/comfy.py has the conventions).

Everything is checked before any tensor is read: missing files, unreadable or truncated
safetensors, a DiT of another Wan model (T2V, I2V: named, with the S2V parts it lacks), and keys
or shapes that do not fit the model raise `CheckpointError` naming the file.
The model is built on the meta device and the loaded tensors are assigned in place, so a 14B
model is never initialised twice. Paths are local (the file names live in model/layout.py).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from model import comfy, layout
from model.comfy import FP8_DTYPES, FP8_HEADER_DTYPES, quantize_fp8
from model.config import S2VConfig
from model.layout import CheckpointError, detect_layout
from model.timing import LoadTimings, phase
from model.transformer import WanS2VTransformer

__all__ = [
    "CheckpointError",
    "Fp8Linear",
    "fp8_supported",
    "fp8_unsupported",
    "load_transformer",
    "quantize_linears_fp8",
    "save_official_dit",
    "to_comfyui_state_dict",
    "write_safetensors",
    "write_sharded",
]

COMFY_PREFIXES = comfy.DIT_PREFIXES
COMFY_CONFIG_KEY = "config"  # safetensors metadata: an S2VConfig as JSON (files of other sizes than 14B)


# ---------------------------------------------------------------------------------------------
# the official folder


def _official_files(folder: Path) -> tuple[S2VConfig, list[Path]]:
    """Config and shard paths of an official folder; every file checked to exist first."""
    config_path = folder / layout.DIT_CONFIG
    try:  # read before the index is, so a bad config is named first
        config = S2VConfig.from_json(config_path) if config_path.is_file() else None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: not an S2V transformer config ({exc})") from exc
    missing = layout.dit_missing(folder)
    if missing:
        raise CheckpointError(f"{folder}: missing {', '.join(missing)}; {layout.EXPECTED_LAYOUT}")
    if not (folder / layout.DIT_INDEX).is_file():
        return config, [folder / layout.DIT_SINGLE]
    weight_map = layout.read_index(folder)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        have = set(_keys(folder / shard))
        lost = [k for k, s in weight_map.items() if s == shard and k not in have]
        if lost:
            raise CheckpointError(
                f"{folder / shard}: {len(lost)} tensor(s) that {layout.DIT_INDEX} places in this shard are not "
                f"in it, e.g. {lost[:3]} (shard from another download?)"
            )
    return config, [folder / s for s in shards]


def _keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file; CheckpointError if the file is truncated or not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc


# ---------------------------------------------------------------------------------------------
# fp8


def fp8_supported(device: torch.device | str) -> bool:
    """fp8 matmuls (torch._scaled_mm) need a CUDA GPU of compute capability 8.9 (Ada) or newer."""
    return fp8_unsupported(device) is None


def fp8_unsupported(device: torch.device | str) -> str | None:
    """Why `device` cannot run fp8 matmuls (None when it can), for messages."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device {device} is not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    return None


class Fp8Linear(nn.Module):
    """A linear layer whose weight stays in fp8 (with its per-tensor scale), for Hopper/Ada GPUs.

    On CUDA the input is quantized per row to float8_e4m3fn and multiplied by torch._scaled_mm
    with bf16 output; elsewhere (tests, CPU) the weight is dequantized and F.linear is used.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale_weight", scale.float().reshape(()))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = torch.bfloat16 if x.dtype in FP8_DTYPES or x.dtype == torch.float32 else x.dtype
        if not x.is_cuda:
            bias = self.bias.to(out_dtype) if self.bias is not None else None
            return F.linear(x.to(out_dtype), self.dequantized_weight().to(out_dtype), bias)
        rows = x.reshape(-1, self.in_features)
        amax = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
        scale_x = amax / torch.finfo(torch.float8_e4m3fn).max
        fp8_max = torch.finfo(torch.float8_e4m3fn).max
        xq = (rows.float() / scale_x).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
        scale_w = self.scale_weight.expand(1, self.out_features).contiguous()
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_x, scale_b=scale_w, out_dtype=out_dtype)
        if self.bias is not None:  # added apart: not every torch accepts a bias with row-wise scales
            out = out + self.bias.to(out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize_linears_fp8(
    model: nn.Module, prefix: str = "blocks.", work_device: torch.device | str | None = None
) -> int:
    """Replace the nn.Linear layers under `prefix` by Fp8Linear (per-tensor absmax scale), in
    place; an opt-in speed/memory option for fp8 GPUs (about half the bf16 matmul time), at the
    cost of fp8 rounding of the weights. `work_device` (e.g. the GPU while the weights stay on the
    CPU for offload) does the arithmetic; the fp8 weights stay where the weights were.
    Returns how many layers were converted."""
    count = 0
    for name, module in list(model.named_modules()):
        if not name.startswith(prefix) or not isinstance(module, nn.Linear):
            continue
        home = module.weight.device
        weight, scale = quantize_fp8(module.weight.to(work_device or home))
        fp8 = Fp8Linear(weight.to(home), scale.to(home), module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fp8)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# loading


def _comfy_plan(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({our key: file key}, {our weight key: file key of its fp8 scale}) of a ComfyUI file."""
    names: dict[str, str] = {}
    scales: dict[str, str] = {}
    for key in _keys(path):
        ours = comfy.strip_prefix(key, COMFY_PREFIXES)
        if comfy.is_marker(ours):
            continue
        if target := comfy.scale_target(ours):
            scales[target] = key
        else:
            names[ours] = key
    return names, scales


def _check_s2v(path: Path) -> None:
    """CheckpointError when a ComfyUI file is another model's DiT (T2V, I2V, ...), saying what it is."""
    try:
        ident = comfy.identify(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc
    if ident.component != "dit" or not ident.fits:
        raise CheckpointError(
            f"{path}: {ident.what}; use {layout.COMFY_DIT_BF16} or {layout.COMFY_DIT_FP8} (ComfyUI's Wan2.2-S2V "
            "files) or the official Wan2.2-S2V-14B folder"
        )


def _infer_comfy_config(path: Path, names: dict[str, str]) -> S2VConfig:
    """The config of a ComfyUI file, which carries none: the one in its safetensors metadata
    (`config`, written by model.tiny for test files), else the released 14B when its shapes are
    the 14B's; otherwise the caller must pass `config=`."""
    with safe_open(str(path), framework="pt") as f:
        shape = f.get_slice(names["patch_embedding.weight"]).get_shape() if "patch_embedding.weight" in names else None
        meta = f.metadata() or {}
    if COMFY_CONFIG_KEY in meta:
        try:
            return S2VConfig.from_dict(json.loads(meta[COMFY_CONFIG_KEY]))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: the config in its metadata is not an S2V config ({exc})") from exc
    layers = {int(k.split(".")[1]) for k in names if k.startswith("blocks.")}
    ref = S2VConfig.wan_14b()
    if shape is not None and shape[0] == ref.dim and len(layers) == ref.num_layers:
        return ref
    raise CheckpointError(
        f"{path}: not the 14B shapes (width {shape[0] if shape else '?'}, {len(layers)} blocks) and ComfyUI files "
        "carry no config: pass config=S2VConfig(...) (another model's weights?)"
    )


def _verify(model_sd: dict[str, torch.Tensor], shapes: dict[str, tuple], files: list[Path]) -> None:
    """CheckpointError unless the file tensors are exactly the model's keys with its shapes."""
    where = ", ".join(str(p) for p in files)
    missing = [k for k in model_sd if k not in shapes]
    unexpected = [k for k in shapes if k not in model_sd]
    wrong = [
        f"{k}: file {list(shapes[k])} vs model {list(model_sd[k].shape)}"
        for k in model_sd
        if k in shapes and tuple(shapes[k]) != tuple(model_sd[k].shape)
    ]
    lacking = [k.split(".")[0] + ".*" for k in comfy.S2V_DIT_KEYS if k in model_sd and k not in shapes]
    if lacking and len(lacking) == len(comfy.S2V_DIT_KEYS):
        raise CheckpointError(
            f"{where}: a Wan DiT without the S2V parts (no {', '.join(lacking)}): another Wan model (T2V, I2V?); "
            f"use the official Wan2.2-S2V-14B folder or {layout.COMFY_DIT_BF16}"
        )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:4]}")
        if wrong:
            parts.append(f"{len(wrong)} wrong shape(s), e.g. {wrong[:3]}")
        raise CheckpointError(
            f"{where}: does not fit the S2V transformer (another model's weights?): " + "; ".join(parts)
        )


def _shapes(files: list[Path], keymap: dict[str, str] | None = None) -> dict[str, tuple]:
    """{our key: shape} read from the headers only."""
    out: dict[str, tuple] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            for key in names:
                out[key] = tuple(f.get_slice(key).get_shape())
    if keymap is None:
        return out
    return {ours: out[theirs] for ours, theirs in keymap.items()}


def _read(files: list[Path], keymap: dict[str, str] | None, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(our key, tensor) for every tensor of the files, read straight onto `device`."""
    reverse = {theirs: ours for ours, theirs in keymap.items()} if keymap is not None else None
    load_device = str(device) if device.type in ("cpu", "cuda") else "cpu"
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=load_device) as f:
                names = f.keys()
                for key in names:
                    if reverse is not None and key not in reverse:
                        continue
                    yield (reverse[key] if reverse is not None else key), f.get_tensor(key).to(device)
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors data (truncated or corrupt?): {exc}") from exc


def transformer_config(path: str | Path) -> S2VConfig:
    """The transformer configuration of a local official folder (its config.json) or ComfyUI file
    (recognised from its shapes), without reading any weights; CheckpointError as load_transformer."""
    path = Path(path)
    if detect_layout(path) == "official":
        return _official_files(path if path.is_dir() else path.parent)[0]
    file = path if path.is_file() else next(path.glob("*.safetensors"))
    return _infer_comfy_config(file, _comfy_plan(file)[0])


def load_transformer(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    config: S2VConfig | None = None,
    fp8: Literal["keep", "dequantize"] = "keep",
    fp8_device: str | torch.device | None = None,
    timings: LoadTimings | None = None,
) -> WanS2VTransformer:
    """Load the S2V transformer from a local official folder or ComfyUI file.

    dtype: the dtype of all floating weights (bf16 on GPU, float32 for CPU tests).
    config: required only for a ComfyUI file that is not the 14B (such files carry no config).
    fp8: for fp8 ComfyUI files: "keep" keeps the linear weights in fp8 for fp8 matmuls and needs
    a GPU with fp8 support (compute capability 8.9+; otherwise CheckpointError before any
    generation); "dequantize" multiplies them by their scales into `dtype` on any device.
    fp8_device: where the fp8 matmuls will run (default `device`; the GPU when the weights are
    loaded to the CPU for offload).
    Returns the model in eval mode with gradients off, on `device`.
    """
    device = torch.device(device)
    path = Path(path)
    keymap: dict[str, str] | None = None
    scales: dict[str, str] = {}
    with phase(timings, "build"):
        if detect_layout(path) == "official":
            file_config, files = _official_files(path if path.is_dir() else path.parent)
            config = config or file_config
        else:
            files = [path if path.is_file() else next(path.glob("*.safetensors"))]
            _check_s2v(files[0])
            keymap, scales = _comfy_plan(files[0])
            config = config or _infer_comfy_config(files[0], keymap)

        with torch.device("meta"):
            model = WanS2VTransformer(config)
        model_sd = model.state_dict()
        shapes = _shapes(files, keymap)
        _verify(model_sd, shapes, files)

        fp8_keys: set[str] = set()
        if keymap is not None:
            with safe_open(str(files[0]), framework="pt") as f:
                fp8_keys = {k for k, theirs in keymap.items() if f.get_slice(theirs).get_dtype() in FP8_HEADER_DTYPES}
        keep_fp8 = bool(fp8_keys) and fp8 == "keep"
        if keep_fp8 and (why := fp8_unsupported(fp8_device or device)):
            raise CheckpointError(
                f"{files[0]}: stores {len(fp8_keys)} weights as fp8, but {why}: fp8 matmuls need a CUDA GPU of "
                "compute capability 8.9+ (L40S, H100, ...); use precision bf16 (the fp8 weights are then expanded "
                "to bf16 on load, fp8='dequantize') or the bf16 file"
            )

    with phase(timings, "read", device):
        scale_values: dict[str, torch.Tensor] = {}
        if scales:
            with safe_open(str(files[0]), framework="pt") as f:
                scale_values = {k: f.get_tensor(v).float() for k, v in scales.items()}
        state: dict[str, torch.Tensor] = {}
        for key, tensor in _read(files, keymap, device):
            if key in fp8_keys:
                scale = scale_values.get(key, torch.ones(())).to(device)
                if keep_fp8 and _is_linear_weight(model, key):
                    state[key] = tensor
                    state[key[: -len("weight")] + "scale_weight"] = scale
                    continue
                tensor = tensor.float() * scale
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    with phase(timings, "build", device):
        if keep_fp8:
            _install_fp8_linears(model, state)
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_on_meta(make: Callable[[], nn.Module], state: dict[str, torch.Tensor], source: Path, what: str) -> nn.Module:
    """The module `make()` builds, on the meta device, with `state` assigned in place (strict): no
    random initialisation and no second copy of the weights. CheckpointError naming `source` when
    the keys or shapes do not fit."""
    with torch.device("meta"):
        model = make()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: does not match {what}: {exc}") from exc
    return model


def _is_linear_weight(model: nn.Module, key: str) -> bool:
    module_name, _, leaf = key.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(module_name), nn.Linear)


def _install_fp8_linears(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Swap the nn.Linear modules whose weights stay fp8 for Fp8Linear (weights assigned later)."""
    for key in [k for k in state if k.endswith(".scale_weight")]:
        module_name = key[: -len(".scale_weight")]
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        weight = state[module_name + ".weight"]
        bias = state.get(module_name + ".bias")
        setattr(parent, child, Fp8Linear(weight, state[key], bias if old.bias is not None else None))


# ---------------------------------------------------------------------------------------------
# writing


def save_official_dit(model: WanS2VTransformer, folder: str | Path, max_shard_bytes: int = 5 * 1024**3) -> list[Path]:
    """Write the official layout: config.json and safetensors shards of at most `max_shard_bytes`
    (`diffusion_pytorch_model-0000K-of-0000N.safetensors` + index; one shard is written as
    `diffusion_pytorch_model.safetensors` without index). Returns the files written."""
    folder = Path(folder)
    state = model.state_dict()
    entries = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    written = write_sharded(folder, entries, iter(state.values()), max_shard_bytes)
    model.config.to_json(folder / layout.DIT_CONFIG)
    return [*written, folder / layout.DIT_CONFIG]


# safetensors' dtype names
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64"}  # fmt: skip


def write_safetensors(
    path: Path,
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterator[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """A safetensors file of `entries` (name, shape, dtype), the data taken from `tensors` in the
    same order and written as it comes. Written by hand because safetensors' own writers take
    every tensor in host memory at once (a 32 GB DiT file); the format is an 8-byte header length,
    the JSON header (space-padded to 8 bytes), then the tensors' bytes back to back. The file is
    written as `.<name>.part` and renamed when complete."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    part = path.parent / f".{path.name}.part"
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, shape, dtype), tensor in zip(entries, tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: expected {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
            if tensor.numel():
                f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return part.replace(path)


def write_sharded(
    folder: Path,
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterator[torch.Tensor],
    max_shard_bytes: int,
) -> list[Path]:
    """The official DiT's weight files: `diffusion_pytorch_model-0000K-of-0000N.safetensors` of at
    most `max_shard_bytes` each and their index, or one `diffusion_pytorch_model.safetensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list] = [[]]
    size = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    if len(shards) == 1:
        names = [layout.DIT_SINGLE]
    else:
        names = [f"{layout.DIT_STEM}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = []
    for name, shard in zip(names, shards, strict=True):
        values = (next(tensors) for _ in shard)
        written.append(write_safetensors(folder / name, shard, values, {"format": "pt"}))
    if len(shards) > 1:
        total = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, s, d in entries)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {entry[0]: name for name, shard in zip(names, shards, strict=True) for entry in shard},
        }
        (folder / layout.DIT_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(folder / layout.DIT_INDEX)
    return written


def to_comfyui_state_dict(
    model: WanS2VTransformer, *, fp8: bool = False, prefix: str = "model.diffusion_model."
) -> dict[str, torch.Tensor]:
    """Our weights under ComfyUI's naming (the inverse of the load mapping), for tests and export.

    fp8=True writes the linear weights of the blocks as float8_e4m3fn with a float32 per-tensor
    `scale_weight` (absmax / 448) and the `scaled_fp8` marker, like ComfyUI's `*_fp8_scaled` files.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        module_name = key.rpartition(".")[0]
        if fp8 and key.startswith("blocks.") and _is_linear_weight(model, key):
            out[prefix + key], out[prefix + module_name + ".scale_weight"] = quantize_fp8(tensor)
        else:
            out[prefix + key] = tensor
    if fp8:
        out[prefix + comfy.SCALED_FP8] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out
