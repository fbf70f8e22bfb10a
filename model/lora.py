"""LoRAs for the S2V transformer: the key styles users have, merged or applied beside the weights.

    lora = load_lora("style.safetensors", model)             # parsed and matched to the model
    set_loras(model, [(lora, 0.8), (other, 1.0)])            # several at once, a strength each
    set_loras(model, [])                                     # the base weights again, exactly

Key styles (`STYLES`, a table: a new style is a row). Each file is read with the first style whose
marker one of its keys matches; every style accepts the factor spellings `lora_down` / `lora_up`
(kohya, ComfyUI), `lora_A` / `lora_B` (PEFT, diffusers) and `lora_A.default` / `lora_B.default`
(PEFT adapters saved as they are, as DiffSynth-Studio's trainer does), an optional `<layer>.alpha`
(scale alpha / rank; without it the scale is 1, as diffusers and DiffSynth apply PEFT files), and
full differences `<layer>.diff` / `<layer>.diff_b` (weight and bias, as ComfyUI reads them):

- kohya: `lora_unet_` + our module path with `_` for `.`
  (`lora_unet_blocks_0_self_attn_q.lora_down.weight`);
- diffsynth: our module paths with PEFT's adapter suffix, optionally under `pipe.dit.` / `dit.`
  (`blocks.0.self_attn.q.lora_A.default.weight`);
- comfyui: our module paths under `diffusion_model.` / `model.diffusion_model.`
  (`diffusion_model.blocks.0.ffn.0.lora_up.weight`);
- peft: our paths, or diffusers' Wan names (`attn1.to_q`, `ffn.net.0.proj`, ...), optionally under
  `transformer.` / `base_model.model.` (`transformer.blocks.0.attn1.to_q.lora_A.weight`);
- liveavatar: LiveAvatar's distillation LoRA (PEFT keys on our paths, alpha 64 not stored), read
  only when asked for by name (`load_lora(..., style="liveavatar")`, distilled mode).

(The official checkpoint, ComfyUI's `WanModel_S2V` and DiffSynth's `WanS2VModel` share our module
names, so those files need no renaming beyond prefixes.) Every key must land on a parameter of the
model with a fitting shape; otherwise `LoraError` names the file and the first unmatched keys.

How a LoRA is applied, per target weight:

- **merged** (bf16 / fp16 / float32 weights): W <- W0 + sum(strength * scale * up @ down), computed
  in float32 and written into the weight in place, so a forward costs nothing extra. Rows of a
  batch may ask for different LoRAs and a pool worker serves segments of many rows, so switching
  must give back W0 exactly: the first time a weight is touched its base value is copied to host
  memory and every switch starts again from that copy (subtracting the delta back would leave
  bf16 rounding behind). The copy costs host memory for the touched weights only (a LoRA on all
  block linears of the 14B: ~25 GB in bf16), kept for the process; a re-read from the checkpoint
  would be exact too but takes minutes where a host copy takes a second.
- **unmerged** (fp8 weights, `checkpoint.Fp8Linear`): merging would requantize the weight and lose
  the LoRA in fp8 rounding, so the layer is wrapped (as PEFT wraps a base layer): the wrapper's
  forward is base(x) + sum(strength * scale * up(down(x))) in the activations' dtype, and its
  `dequantized_weight()` (which the transformer reads for the layers it evaluates in float32)
  includes the deltas. Clearing puts the untouched fp8 layer back. The transformer's forward is
  not changed; swapping modules makes torch.compile'd blocks recompile once per LoRA set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from model.checkpoint import FP8_DTYPES
from model.offload import block_streamer

__all__ = ["STYLES", "Lora", "LoraError", "LoraStyle", "active_loras", "load_lora", "set_loras"]


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model (the message names the file and keys)."""


# ---------------------------------------------------------------------------------------------
# key styles

# Suffixes after the layer name, spelled as the styles spell them -> the part they hold.
_PARTS = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)

# diffusers' WanTransformer3DModel names -> ours (the parts a Wan LoRA trained there touches).
DIFFUSERS_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "norm2": "norm3",
    "scale_shift_table": "modulation",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
}


def _ours(name: str, index: ModelIndex) -> str | None:
    return name if name in index.targets else None


def _kohya(name: str, index: ModelIndex) -> str | None:
    return index.underscored.get(name.lstrip("_"))  # Wan-Fun files write `lora_unet__blocks_...`


def _diffusers(name: str, index: ModelIndex) -> str | None:
    if name in index.targets:
        return name
    for theirs, ours in DIFFUSERS_NAMES.items():
        if name == theirs or name.endswith("." + theirs):
            candidate = name[: len(name) - len(theirs)] + ours
            if candidate in index.targets:
                return candidate
    return None


@dataclass(frozen=True)
class LoraStyle:
    """One way of naming a LoRA's tensors: how to recognise it and how its layer names map to ours."""

    name: str
    marker: re.Pattern[str]
    """A file is of this style when one of its keys matches (re.search)."""
    prefixes: tuple[str, ...]
    """Stripped from the front of each key (the first that matches)."""
    resolve: Callable[[str, ModelIndex], str | None]
    """The layer name in the file (prefix and part suffix removed) -> our module or parameter path."""
    alpha: float | None = None
    """The alpha of files of this style that store none (None: scale 1)."""
    detect: bool = True
    """Whether `load_lora` may pick this style by its marker; False: only when asked for by name."""


STYLES: tuple[LoraStyle, ...] = (
    LoraStyle("kohya", re.compile(r"^lora_unet_"), ("lora_unet_",), _kohya),
    LoraStyle(
        "diffsynth",
        re.compile(r"\.lora_[AB]\.default\.weight$|^pipe\.dit\."),
        ("pipe.dit.", "dit.", "diffusion_model."),
        _ours,
    ),
    LoraStyle(
        "comfyui",
        re.compile(r"^(model\.)?diffusion_model\.|\.lora_(up|down)\.weight$"),
        ("model.diffusion_model.", "diffusion_model."),
        _ours,
    ),
    LoraStyle(
        "peft",
        re.compile(r"\.lora_[AB]\.weight$"),
        ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model."),
        _diffusers,
    ),
    # LiveAvatar's distillation LoRA (model/distilled.py): PEFT keys on our paths, trained with
    # alpha 64 (rank 128: scale 0.5) that the file does not store. Its keys look like DiffSynth's,
    # so it is read by name only (distilled mode), never detected.
    LoraStyle(
        "liveavatar",
        re.compile(r"\.lora_[AB](\.default)?\.weight$"),
        ("base_model.model.",),
        _ours,
        alpha=64.0,
        detect=False,
    ),
)


@dataclass
class ModelIndex:
    """The names a LoRA may target in a model: {path: parameter} for module weights (by module
    path) and plain parameters (by their own path), and kohya's underscored spellings of them."""

    targets: dict[str, str]
    """module or parameter path -> the parameter path a delta adds to (`<module>.weight` or itself)."""
    underscored: dict[str, str]

    @classmethod
    def of(cls, model: nn.Module) -> ModelIndex:
        params = base_parameters(model)
        targets = {name: name for name in params}
        for name in params:
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module:
                targets[module] = name
        return cls(targets, {name.replace(".", "_"): name for name in targets})


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: parameter} under the model's own names, also while fp8 layers are wrapped
    (`<layer>.base.weight` is reported as `<layer>.weight`)."""
    wrapped = getattr(getattr(model, "_lora_state", None), "wrapped", {})
    out = {}
    for name, param in model.named_parameters():
        for layer in wrapped:
            if name.startswith(layer + ".base."):
                name = layer + "." + name[len(layer) + len(".base.") :]
                break
        out[name] = param
    return out


def detect_style(keys: Iterable[str]) -> LoraStyle | None:
    keys = list(keys)
    for style in STYLES:
        if style.detect and any(style.marker.search(k) for k in keys):
            return style
    return None


# ---------------------------------------------------------------------------------------------
# a parsed LoRA


@dataclass
class Delta:
    """What a LoRA adds to one parameter: strength x (scale * up @ down [+ diff]) and a bias delta."""

    param: str
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 without alpha."""
        if self.alpha is None or self.down is None:
            return 1.0
        return self.alpha / self.down.shape[0]

    def dense(self, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """The full float32 weight delta (without strength), shaped like the weight."""
        out = None
        if self.up is not None and self.down is not None:
            up = self.up.to(device, torch.float32).reshape(self.up.shape[0], -1)
            down = self.down.to(device, torch.float32).reshape(self.down.shape[0], -1)
            out = (up @ down).reshape(shape) * self.scale
        if self.diff is not None:
            diff = self.diff.to(device, torch.float32).reshape(shape)
            out = diff if out is None else out + diff
        return out


@dataclass
class Lora:
    """A LoRA file read and matched to a model: one Delta per target parameter."""

    path: str
    style: str
    deltas: dict[str, Delta]

    @property
    def key(self) -> str:
        return self.path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()
                return {k: f.get_tensor(k) for k in names}
        state = torch.load(path, map_location="cpu", weights_only=True)  # .pt/.pth/.ckpt: pickles, weights only
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise LoraError(f"LoRA file {path}: unreadable ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoraError(f"LoRA file {path}: not a dictionary of tensors")
    return state


def _split(key: str) -> tuple[str, str] | None:
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def load_lora(path: str | Path, model: nn.Module, style: str | None = None) -> Lora:
    """Read a LoRA file (safetensors, or a weights-only torch pickle) and match every key to `model`.

    style: the name of a row of STYLES to read it with (default: detected from the keys).
    Raises LoraError naming the file when it is unreadable, of no known style, or when keys name no
    parameter of the model or do not fit its shape (the first unmatched keys are listed)."""
    path = Path(path)
    tensors = _read_tensors(path)
    if not tensors:
        raise LoraError(f"LoRA file {path} holds no tensors")
    if style is None:
        style = detect_style(tensors)
    else:
        named = {s.name: s for s in STYLES}
        if style not in named:
            raise LoraError(f"LoRA key style {style!r}: expected one of {', '.join(named)}")
        style = named[style]
    if style is None:
        raise LoraError(
            f"LoRA file {path}: no known key style (kohya lora_unet_*, ComfyUI diffusion_model.*.lora_up/down, "
            f"PEFT/diffusers lora_A/lora_B, DiffSynth); first keys: {sorted(tensors)[:4]}"
        )
    index = ModelIndex.of(model)
    params = base_parameters(model)
    deltas: dict[str, Delta] = {}
    unmatched: list[str] = []
    for key in sorted(tensors):
        stripped = next((key[len(p) :] for p in style.prefixes if key.startswith(p)), key)
        split = _split(stripped)
        ours = style.resolve(split[0], index) if split else None
        if split is None or ours is None:
            unmatched.append(key)
            continue
        target = index.targets[ours]
        if split[1] == "diff_b":  # the bias of the module, not its weight
            target = target.rpartition(".")[0] + ".bias" if target.endswith(".weight") else ""
            if target not in params:
                unmatched.append(key)
                continue
        delta = deltas.setdefault(ours, Delta(param=index.targets[ours]))
        value = tensors[key]
        if split[1] == "alpha":
            delta.alpha = float(value.float().reshape(-1)[0])
        else:
            setattr(delta, split[1], value)
        delta.keys.append(key)
    if unmatched:
        raise LoraError(
            f"LoRA file {path} ({style.name} style): {len(unmatched)} key(s) match no layer of the S2V transformer "
            f"(a LoRA for another model?), first: {unmatched[:5]}"
        )
    if style.alpha is not None:
        for delta in deltas.values():
            delta.alpha = style.alpha if delta.alpha is None else delta.alpha
    problems = [p for d in deltas.values() if (p := _check(d, params))]
    if problems:
        raise LoraError(
            f"LoRA file {path} ({style.name} style) does not fit the S2V transformer: " + "; ".join(problems[:5])
        )
    return Lora(str(path), style.name, deltas)


def _check(delta: Delta, params: dict[str, torch.Tensor]) -> str | None:
    """Why `delta` cannot apply to its parameter, or None."""
    shape = params[delta.param].shape
    where = delta.keys[0]
    if (delta.up is None) != (delta.down is None):
        return f"{where}: only one of the two LoRA factors is present"
    if delta.up is None and delta.diff is None and delta.diff_b is None:
        return f"{where}: an alpha without factors"
    if delta.up is not None:
        rank = delta.down.shape[0]
        out, inner = shape[0], shape[1:].numel() if len(shape) > 1 else 0
        if delta.up.shape[0] != out or delta.up[0].numel() != rank or delta.down[0].numel() != inner:
            return (
                f"{where}: factors {list(delta.up.shape)} x {list(delta.down.shape)} do not fit the weight "
                f"{delta.param} {list(shape)}"
            )
    if delta.diff is not None and delta.diff.numel() != shape.numel():
        return f"{where}: diff {list(delta.diff.shape)} does not fit {delta.param} {list(shape)}"
    if delta.diff_b is not None:
        bias = params[delta.param.rpartition(".")[0] + ".bias"]
        if delta.diff_b.numel() != bias.numel():
            return f"{where}: diff_b {list(delta.diff_b.shape)} does not fit the bias {list(bias.shape)}"
    return None


# ---------------------------------------------------------------------------------------------
# applying


class LoraLinear(nn.Module):
    """A linear layer (fp8 weights) with LoRAs beside it: base(x) + sum(s_i * up_i(down_i(x))) + bias deltas.

    `weight`, `bias` and `dequantized_weight()` answer for the wrapped layer, the last one with the
    deltas included (the transformer evaluates some layers from their dense weight in float32)."""

    def __init__(self, base: nn.Module, terms: list[tuple[Delta, float]], device: torch.device) -> None:
        super().__init__()
        self.base = base
        self._factors: list[tuple[str, str, float]] = []
        self._diffs: list[tuple[str, float]] = []
        bias_delta = None
        for i, (delta, strength) in enumerate(terms):
            if delta.up is not None:
                down = delta.down.to(device).reshape(delta.down.shape[0], -1)
                self.register_buffer(f"down_{i}", down, persistent=False)
                self.register_buffer(f"up_{i}", delta.up.to(device).reshape(delta.up.shape[0], -1), persistent=False)
                self._factors.append((f"down_{i}", f"up_{i}", strength * delta.scale))
            if delta.diff is not None:
                self.register_buffer(f"diff_{i}", delta.diff.to(device).reshape(base.weight.shape), persistent=False)
                self._diffs.append((f"diff_{i}", strength))
            if delta.diff_b is not None:
                term = delta.diff_b.to(device, torch.float32).reshape(-1) * strength
                bias_delta = term if bias_delta is None else bias_delta + term
        self.register_buffer("bias_delta", bias_delta, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def dequantized_weight(self) -> torch.Tensor:
        dequant = getattr(self.base, "dequantized_weight", None)
        weight = (dequant() if dequant is not None else self.base.weight).float()
        for down, up, scale in self._factors:
            weight = weight + scale * (getattr(self, up).float() @ getattr(self, down).float())
        for diff, strength in self._diffs:
            weight = weight + strength * getattr(self, diff).float()
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = x.to(out.dtype)
        for down, up, scale in self._factors:
            d, u = getattr(self, down), getattr(self, up)
            out = out + F.linear(F.linear(h, d.to(h.dtype)), u.to(h.dtype)) * scale
        for diff, strength in self._diffs:
            out = out + F.linear(h, getattr(self, diff).to(h.dtype)) * strength
        if self.bias_delta is not None:
            out = out + self.bias_delta.to(out.dtype)
        return out


@dataclass
class _LoraState:
    """What set_loras keeps on the model: the active set, base copies, wrapped layers."""

    active: tuple[tuple[str, float], ...] = ()
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    """parameter path -> its base value on the host (taken the first time a LoRA touches it)."""
    wrapped: dict[str, LoraLinear] = field(default_factory=dict)
    """module path -> the wrapper standing in for it."""
    touched: set[str] = field(default_factory=set)
    """parameters the active LoRAs changed in place (restored from `base` on the next switch)."""


def _state(model: nn.Module) -> _LoraState:
    state = getattr(model, "_lora_state", None)
    if state is None:
        state = _LoraState()
        model._lora_state = state  # kept on the module, as diffusers keeps its hook registry
    return state


def active_loras(model: nn.Module) -> tuple[tuple[str, float], ...]:
    """(path, strength) of the LoRAs applied to `model`, in the order given."""
    return _state(model).active


def _is_fp8(param: torch.Tensor) -> bool:
    return param.dtype in FP8_DTYPES


@torch.no_grad()
def set_loras(
    model: nn.Module,
    loras: Sequence[tuple[Lora, float]],
    device: torch.device | str | None = None,
    merge: bool | None = None,
) -> None:
    """Make `model` run with exactly these LoRAs (each with its strength); [] restores the base.

    A no-op when the same LoRAs and strengths are already applied. `merge`: None merges into
    every weight but fp8 ones (see the module docstring), False applies all unmerged (Linear
    layers only), True merges all (fp8 weights refused). `device`: where unmerged factors live
    (default: beside the weight; pass the compute device for a model whose blocks are streamed)."""
    state = _state(model)
    wanted = tuple((lora.key, float(strength)) for lora, strength in loras)
    if wanted == state.active:
        return
    params = dict(model.named_parameters())
    merged: dict[str, list[tuple[Delta, float]]] = {}
    unmerged: dict[str, list[tuple[Delta, float]]] = {}
    for lora, strength in loras:
        for delta in lora.deltas.values():
            name = delta.param
            module_name = name.rpartition(".")[0]
            if module_name in state.wrapped:  # its fp8 weight now sits inside the wrapper
                name = f"{module_name}.weight"
            elif name not in params:
                raise LoraError(f"LoRA {lora.path}: {delta.param} is not a parameter of this model")
            fp8 = module_name in state.wrapped or _is_fp8(params[name])
            if merge and fp8:
                raise LoraError(f"LoRA {lora.path}: {name} is stored in fp8 and cannot be merged exactly")
            beside = fp8 or (merge is False and isinstance(model.get_submodule(module_name), nn.Linear))
            (unmerged if beside else merged).setdefault(name, []).append((delta, float(strength)))
    _restore(model, state)
    try:
        params = dict(model.named_parameters())
        for name, terms in merged.items():
            _merge(name, params[name], params, terms, state)
        for name, terms in unmerged.items():
            module_name = name.rpartition(".")[0]
            base = model.get_submodule(module_name)
            wrapper = LoraLinear(base, terms, torch.device(device) if device else base.weight.device)
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, wrapper)
            state.wrapped[module_name] = wrapper
    except BaseException:
        _restore(model, state)
        raise
    finally:
        _forget_streamed(model)
    state.active = wanted


def _merge(name: str, param: torch.Tensor, params: dict, terms: list[tuple[Delta, float]], state: _LoraState) -> None:
    """param <- base + sum(strength * delta) in float32 (and the same for the bias deltas)."""
    weight_terms = [(d, s) for d, s in terms if d.up is not None or d.diff is not None]
    bias_terms = [(d, s) for d, s in terms if d.diff_b is not None]
    if weight_terms:
        value = _base(name, param, state)
        for delta, strength in weight_terms:
            value = value + strength * delta.dense(param.shape, param.device)
        param.copy_(value.to(param.dtype))
    if bias_terms:
        bias_name = name.rpartition(".")[0] + ".bias"
        bias = params[bias_name]
        value = _base(bias_name, bias, state)
        for delta, strength in bias_terms:
            value = value + strength * delta.diff_b.to(bias.device, torch.float32).reshape(bias.shape)
        bias.copy_(value.to(bias.dtype))


def _base(name: str, param: torch.Tensor, state: _LoraState) -> torch.Tensor:
    """The base value of `param` in float32 on its device; its host copy is taken on first use."""
    if name not in state.base:
        state.base[name] = param.detach().to("cpu", copy=True)
    state.touched.add(name)
    return state.base[name].to(param.device, torch.float32)


def _restore(model: nn.Module, state: _LoraState) -> None:
    """Base weights back (copied from the host copies) and wrapped layers unwrapped."""
    for name, wrapper in state.wrapped.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper.base)
    state.wrapped.clear()
    params = dict(model.named_parameters())
    for name in state.touched:
        params[name].copy_(state.base[name].to(params[name].device))
    state.touched.clear()
    state.active = ()


def _forget_streamed(model: nn.Module) -> None:
    """A block streamer keeps copies of blocks in GPU slots across forwards: drop them, so the
    next forward copies the changed weights."""
    blocks = getattr(model, "blocks", None)
    streamer = block_streamer(model) if isinstance(blocks, nn.ModuleList) else None
    if streamer is not None:
        streamer.reset()
