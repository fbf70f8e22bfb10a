"""Wan2.2-S2V checkpoints with random weights, written in the real layouts, at any size.

`write_random_checkpoint(out, sizes, layout)` writes every component exactly as the released files
store it, so tests, CI and GPU benchmarks load it through the same code as the original:

    official (`Wan-AI/Wan2.2-S2V-14B`):
        config.json + diffusion_pytorch_model-0000K-of-0000N.safetensors + .index.json   (the DiT)
        models_t5_umt5-xxl-enc-bf16.pth      (umT5 encoder in Wan's naming, bf16, torch.save)
        google/umt5-xxl/                     (a small Unigram tokenizer trained here)
        Wan2.1_VAE.pth                       (the Wan2.1 VAE in Wan's naming, float32)
        wav2vec2-large-xlsr-53-english/      (a Wav2Vec2ForCTC folder: config, weights, processor)
    comfyui (ComfyUI's models/ tree: diffusion_models/, text_encoders/, vae/, audio_encoders/;
    or all in one folder with flat=True):
        wan2.2_s2v_14B_bf16.safetensors      or  wan2.2_s2v_14B_fp8_scaled.safetensors
        umt5_xxl_fp16.safetensors            or  umt5_xxl_fp8_e4m3fn_scaled.safetensors (tokenizer embedded)
        wan_2.1_vae.safetensors (bf16), wav2vec2_large_english_fp16.safetensors

`Sizes.full()` is the released 14B model (about 46 GB official, 26 GB ComfyUI fp8, 45 GB ComfyUI
bf16; `estimate_bytes`); `Sizes.tiny()` the same architecture small enough for CPU tests in seconds
(`write_tiny_checkpoint`, `write_tiny_comfyui`). Each tensor is drawn on `device` (a GPU for the
full size) with a cheap RNG, scaled as torch initialises layers (std 1/sqrt(3 fan-in), norm scales
about 1) so activations stay O(1) in bf16, rounded through every dtype either layout stores it in
(so the official and the ComfyUI set of one seed hold the same values), and streamed to disk one
tensor at a time: the host holds one tensor at a time (the umT5 .pth excepted: torch.save writes
it whole, 11 GB). Files appear under their names only when complete. Nothing is downloaded; the
tokenizer is trained offline with `tokenizers`.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
)

from model import comfy, layout
from model.checkpoint import COMFY_CONFIG_KEY, write_safetensors, write_sharded
from model.config import S2VConfig
from model.distilled import liveavatar_targets
from model.text_encoder import hf_to_wan_t5, spiece_model_bytes
from model.transformer import WanS2VTransformer
from model.vae import diffusers_to_wan_vae

TINY_VAE = {"base_dim": 2, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1}
_SENTENCES = [
    "A woman speaks to the camera in a bright office, smiling and nodding.",
    "A man presents the quarterly results with calm gestures.",
    "画面模糊，最差质量，静止不动的画面，杂乱的背景",
    "Close-up portrait of a person talking, natural light, sharp focus.",
    "The teacher explains the lesson slowly and clearly to the students.",
    "blurry, low quality, static, extra fingers, deformed face, subtitles",
]
_CTC_CHARACTERS = "abcdefghijklmnopqrstuvwxyz'"


@dataclass(frozen=True)
class Sizes:
    """The size of every component."""

    dit: S2VConfig
    t5: dict  # UMT5Config keywords; vocab_size None: the tokenizer's size + 8
    vae: dict  # AutoencoderKLWan keywords
    wav2vec: dict  # Wav2Vec2Config keywords
    shard_bytes: int = 5 * 1024**3  # the official DiT's shards

    @classmethod
    def full(cls) -> Sizes:
        """The released Wan2.2-S2V-14B: 14B DiT, umT5-XXL encoder, Wan2.1 VAE, wav2vec2-large-xlsr-53."""
        return cls(
            dit=S2VConfig.wan_14b(),
            t5={"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64},
            vae={"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2},
            wav2vec={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "intermediate_size": 4096, "conv_dim": (512,) * 7, "num_conv_pos_embeddings": 128,
                     "num_conv_pos_embedding_groups": 16},  # fmt: skip
        )

    @classmethod
    def tiny(cls) -> Sizes:
        """S2VConfig.tiny() and encoders to match: a 2-layer umT5 of width 32, a narrow VAE, a
        wav2vec2 of width 32 with 24 layers (25 hidden states, as the DiT averages)."""
        cfg = S2VConfig.tiny()
        return cls(
            dit=cfg,
            t5={"vocab_size": None, "d_model": cfg.text_dim, "d_kv": cfg.text_dim // 2, "d_ff": cfg.text_dim * 2,
                "num_layers": 2, "num_heads": 2},  # fmt: skip
            vae=dict(TINY_VAE),
            wav2vec={"hidden_size": cfg.audio_dim, "num_hidden_layers": cfg.audio_num_layers - 1,
                     "num_attention_heads": 1, "intermediate_size": cfg.audio_dim * 2, "conv_dim": (16,) * 7,
                     "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2},  # fmt: skip
            shard_bytes=200_000,
        )


@dataclass
class Written:
    """What a writer produced."""

    files: list[Path] = field(default_factory=list)
    bytes: int = 0

    def add(self, path: Path) -> None:
        self.files.append(path)
        self.bytes += path.stat().st_size


# ---------------------------------------------------------------------------------------------
# the public writers


def write_random_checkpoint(
    out: str | Path,
    sizes: Sizes | None = None,
    layout_name: Literal["official", "comfyui"] = "official",
    *,
    dtype: torch.dtype = torch.bfloat16,
    fp8_scaled: bool = False,
    flat: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_file: Callable[[Path], None] | None = None,
) -> Written:
    """Write a complete Wan2.2-S2V checkpoint with random weights into `out` (see the module doc).

    sizes: Sizes.full() (default) or Sizes.tiny(). dtype: the DiT's stored dtype (the official
    release and ComfyUI's bf16 file: bf16). fp8_scaled (comfyui): the DiT's block linears and the
    umT5 linears as scaled fp8 (ComfyUI's `_fp8_scaled` files). flat (comfyui): all files in `out`
    instead of ComfyUI's model folders. device: where the values are drawn ("cuda" for the full
    size). The same seed gives the same values in both layouts (up to the fp8 rounding).
    on_file(path) is called after each file is complete."""
    sizes = sizes or Sizes.full()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    written = Written()

    def done(path: Path) -> None:
        written.add(path)
        if on_file is not None:
            on_file(path)

    vocab = _tokenizer_vocab()
    t5 = UMT5Config(**_t5_keywords(sizes, len(vocab)))
    parts = {
        "dit": _Component("dit", _dit_shapes(sizes.dit), (dtype,), seed, device),
        "t5": _Component("t5", _t5_shapes(t5), (torch.bfloat16, torch.float16), seed, device),
        "vae": _Component("vae", _vae_shapes(sizes.vae), (torch.bfloat16,), seed, device),
        "wav2vec": _Component("wav2vec", _wav2vec_shapes(_wav2vec_config(sizes)), (torch.float16,), seed, device),
    }
    if layout_name == "official":
        _write_official(out, sizes, parts, vocab, dtype, done)
    elif layout_name == "comfyui":
        _write_comfyui(out, sizes, parts, vocab, dtype, fp8_scaled, flat, done)
    else:
        raise ValueError(f"layout {layout_name!r}: expected 'official' or 'comfyui'")
    return written


def write_tiny_checkpoint(folder: str | Path, seed: int = 0, max_shard_bytes: int = 200_000) -> Path:
    """A complete tiny S2V checkpoint (official layout, random weights) in `folder`, the DiT in
    several shards (`max_shard_bytes`) so the index is exercised too. Deterministic for a seed."""
    sizes = replace(Sizes.tiny(), shard_bytes=max_shard_bytes)
    write_random_checkpoint(folder, sizes, "official", seed=seed)
    return Path(folder)


def write_tiny_comfyui(folder: str | Path, seed: int = 0, fp8_scaled: bool = False, flat: bool = False) -> Path:
    """The tiny checkpoint of `write_tiny_checkpoint(seed=seed)` as ComfyUI's single files."""
    write_random_checkpoint(folder, Sizes.tiny(), "comfyui", seed=seed, fp8_scaled=fp8_scaled, flat=flat)
    return Path(folder)


def estimate_bytes(
    sizes: Sizes | None = None, layout_name: str = "official", *, dtype: torch.dtype = torch.bfloat16,
    fp8_scaled: bool = False,
) -> dict[str, int]:  # fmt: skip
    """Bytes of tensor data per component that `write_random_checkpoint` would write (headers,
    configs and the tokenizer, a few MB, not counted)."""
    sizes = sizes or Sizes.full()
    t5 = UMT5Config(**_t5_keywords(sizes, len(_tokenizer_vocab()) if sizes.t5["vocab_size"] is None else 0))
    dit = _dit_shapes(sizes.dit)
    linears = _linear_weights(sizes.dit)
    t5_shapes = _t5_shapes(t5)
    official = layout_name == "official"
    fp8 = fp8_scaled and not official

    def nbytes(shapes: dict, item: int, fp8_keys: set[str] = frozenset()) -> int:
        return sum(math.prod(s) * (1 if k in fp8_keys else item) for k, s in shapes.items())

    w2v = _wav2vec_shapes(_wav2vec_config(sizes))
    item = torch.empty((), dtype=dtype).element_size()
    return {
        "dit": nbytes(dit, item, linears if fp8 else set()),
        "text_encoder": nbytes(t5_shapes, 2, {k for k in t5_shapes if _is_t5_linear(k)} if fp8 else set()),
        "vae": nbytes(_vae_shapes(sizes.vae), 4 if official else 2),
        "audio_encoder": nbytes(w2v, 4 if official else 2),
    }


# ---------------------------------------------------------------------------------------------
# values


@dataclass
class _Component:
    """The tensors of one component in its canonical names, and how to draw each one."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    rounding: tuple[torch.dtype, ...]  # every dtype a layout stores it in (values representable in all)
    seed: int
    device: torch.device

    def value(self, key: str) -> torch.Tensor:
        """The float32 values of `key`, on the device; the same for a key whatever else is drawn."""
        shape = self.shapes[key]
        gen = torch.Generator(self.device).manual_seed(self.seed * 7919 + zlib.crc32(f"{self.name}/{key}".encode()))
        if key.endswith("casual_audio_encoder.weights"):  # a normalising sum: keep it away from 0
            x = torch.rand(shape, generator=gen, device=self.device) + 0.5
        elif key.endswith(("gamma", "original0", "weight_g")) or ("norm" in key and len(shape) == 1):
            x = 1 + 0.1 * torch.randn(shape, generator=gen, device=self.device)  # norm scales about 1
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 0
            x = torch.randn(shape, generator=gen, device=self.device) * ((3 * fan_in) ** -0.5 if fan_in else 0.02)
        for dtype in self.rounding:
            x = x.to(dtype)
        return x.float()


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _dit_shapes(config: S2VConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _meta_shapes(WanS2VTransformer(config))


def _linear_weights(config: S2VConfig) -> set[str]:
    """The DiT's block linear weights: those ComfyUI's fp8-scaled file (and Fp8Linear) keep in fp8."""
    with torch.device("meta"):
        model = WanS2VTransformer(config)
    linear = torch.nn.Linear
    return {f"{n}.weight" for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, linear)}


def _t5_keywords(sizes: Sizes, tokenizer_size: int) -> dict:
    kw = dict(sizes.t5)
    kw["vocab_size"] = kw["vocab_size"] or tokenizer_size + 8
    return kw | {"feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "tie_word_embeddings": False,
                 "relative_attention_num_buckets": 32}  # fmt: skip


def _t5_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
    """transformers' names (ComfyUI's); the tied `encoder.embed_tokens` is the same tensor as `shared`."""
    with torch.device("meta"):
        shapes = _meta_shapes(UMT5EncoderModel(config))
    shapes.pop("encoder.embed_tokens.weight", None)
    return shapes


def _is_t5_linear(key: str) -> bool:
    return key.endswith(("SelfAttention.q.weight", "SelfAttention.k.weight", "SelfAttention.v.weight",
                         "SelfAttention.o.weight", "wi_0.weight", "wi_1.weight", "wo.weight"))  # fmt: skip


def _vae_shapes(kwargs: dict) -> dict[str, tuple[int, ...]]:
    """Wan's names (both layouts)."""
    with torch.device("meta"):
        model = AutoencoderKLWan(**kwargs)
    return {k: tuple(v.shape) for k, v in diffusers_to_wan_vae(model.state_dict(), kwargs["num_res_blocks"]).items()}


def _wav2vec_config(sizes: Sizes) -> Wav2Vec2Config:
    """wav2vec2-large-xlsr-53's configuration (stable layer norm, 50 Hz) at `sizes.wav2vec`."""
    return Wav2Vec2Config(
        vocab_size=len(_ctc_vocab(_CTC_CHARACTERS)), feat_extract_norm="layer", do_stable_layer_norm=True,
        conv_bias=True, pad_token_id=0, architectures=["Wav2Vec2ForCTC"], **sizes.wav2vec,
    )  # fmt: skip


def _wav2vec_shapes(config: Wav2Vec2Config) -> dict[str, tuple[int, ...]]:
    """The Wav2Vec2ForCTC folder's names (`wav2vec2.*`, `lm_head.*`)."""
    with torch.device("meta"):
        return _meta_shapes(Wav2Vec2ForCTC(config))


# ---------------------------------------------------------------------------------------------
# layouts


def _write_official(out: Path, sizes: Sizes, parts: dict[str, _Component], vocab, dtype, done) -> None:
    dit = parts["dit"]
    shards = write_sharded(out, [(k, s, dtype) for k, s in dit.shapes.items()], _as(dit, dtype), sizes.shard_bytes)
    for path in shards:
        done(path)
    sizes.dit.to_json(out / layout.DIT_CONFIG)
    done(out / layout.DIT_CONFIG)

    _write_tokenizer_folder(out / layout.T5_TOKENIZER, vocab)
    t5 = parts["t5"]
    wan_names = hf_to_wan_t5(dict.fromkeys(t5.shapes))  # {wan name: None}, same order
    hf_names = list(t5.shapes)
    state = {w: t5.value(h).to(torch.bfloat16).cpu() for w, h in zip(wan_names, hf_names, strict=True)}
    done(_save_pth(state, out / layout.T5_CHECKPOINT))
    del state

    vae = parts["vae"]
    done(_save_pth({k: vae.value(k).cpu() for k in vae.shapes}, out / layout.VAE_CHECKPOINT))

    w2v = parts["wav2vec"]
    folder = out / layout.WAV2VEC_DIR
    _save_ctc_extras(folder, _ctc_vocab(_CTC_CHARACTERS))
    _wav2vec_config(sizes).save_pretrained(str(folder))
    entries = [(k, s, torch.float32) for k, s in w2v.shapes.items()]
    done(write_safetensors(folder / "model.safetensors", entries, _as(w2v, torch.float32), {"format": "pt"}))


def _write_comfyui(out: Path, sizes: Sizes, parts, vocab, dtype, fp8: bool, flat: bool, done) -> None:
    def folder(component: str) -> Path:
        path = out if flat else out / layout.COMFY_DIRS[component][0]
        path.mkdir(parents=True, exist_ok=True)
        return path

    dit = parts["dit"]
    prefix = comfy.DIT_PREFIXES[0]
    linears = _linear_weights(sizes.dit) if fp8 else set()
    entries, values = _scaled_entries(dit, dtype, linears, prefix)
    if fp8:
        entries.append((prefix + comfy.SCALED_FP8, (0,), torch.float8_e4m3fn))
    name = layout.COMFY_DIT_FP8 if fp8 else layout.COMFY_DIT_BF16
    metadata = {"format": "pt"}
    if sizes.dit != S2VConfig.wan_14b():  # ComfyUI files carry no config; the 14B is recognised by shape
        metadata[COMFY_CONFIG_KEY] = json.dumps(sizes.dit.to_dict())
    done(write_safetensors(folder("dit") / name, entries, _then(values, [], fp8), metadata))

    t5 = parts["t5"]
    store = torch.bfloat16 if fp8 else torch.float16
    entries, values = _scaled_entries(t5, store, {k for k in t5.shapes if _is_t5_linear(k)} if fp8 else set(), "",
                                      scale_input=fp8)  # fmt: skip
    spiece = torch.frombuffer(bytearray(spiece_model_bytes(vocab)), dtype=torch.uint8)
    entries.append((comfy.SPIECE_MODEL, tuple(spiece.shape), torch.uint8))
    if fp8:
        entries.append((comfy.SCALED_FP8, (0,), torch.float8_e4m3fn))
    name = layout.COMFY_T5_FP8 if fp8 else layout.COMFY_T5_FP16
    done(write_safetensors(folder("text_encoder") / name, entries, _then(values, [spiece], fp8)))

    vae = parts["vae"]
    entries = [(k, s, torch.bfloat16) for k, s in vae.shapes.items()]
    done(write_safetensors(folder("vae") / layout.COMFY_VAE_CHECKPOINT, entries, _as(vae, torch.bfloat16)))

    # the positional convolution under weight_g / weight_v, as older exports name it
    w2v = parts["wav2vec"]
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    entries = [(_renamed(k, renames), s, torch.float16) for k, s in w2v.shapes.items()]
    done(write_safetensors(folder("audio_encoder") / layout.COMFY_WAV2VEC, entries, _as(w2v, torch.float16)))


def _renamed(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        key = key.replace(old, new)
    return key


def _as(component: _Component, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for key in component.shapes:
        yield component.value(key).to(dtype)


def _then(values: Iterator[torch.Tensor], more: Sequence[torch.Tensor], marker: bool) -> Iterator[torch.Tensor]:
    yield from values
    yield from more
    if marker:
        yield torch.empty(0, dtype=torch.float8_e4m3fn)


def _scaled_entries(component: _Component, dtype: torch.dtype, fp8_keys: set[str], prefix: str,
                    scale_input: bool = False) -> tuple[list, Iterator[torch.Tensor]]:  # fmt: skip
    """Header entries and values of a ComfyUI file: `fp8_keys` as float8_e4m3fn, each followed by
    its float32 `.scale_weight` (and, with scale_input, a `.scale_input` marker), the rest in `dtype`."""
    entries = []
    for key, shape in component.shapes.items():
        if key in fp8_keys:
            layer = prefix + key[: -len(".weight")]
            entries += [(prefix + key, shape, torch.float8_e4m3fn), (layer + ".scale_weight", (), torch.float32)]
            if scale_input:
                entries.append((layer + ".scale_input", (), torch.float32))
        else:
            entries.append((prefix + key, shape, dtype))

    def values() -> Iterator[torch.Tensor]:
        for key in component.shapes:
            if key in fp8_keys:
                weight, scale = comfy.quantize_fp8(component.value(key))
                yield weight
                yield scale
                if scale_input:
                    yield torch.ones((), dtype=torch.float32)
            else:
                yield component.value(key).to(dtype)

    return entries, values()


# ---------------------------------------------------------------------------------------------
# files


def _save_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    """torch.save (the zip format, readable with torch.load(weights_only=True, mmap=True)), atomically."""
    part = path.parent / f".{path.name}.part"
    torch.save(state, part)
    return part.replace(path)


def _tokenizer_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocabulary [(piece, log-prob)], specials first (<pad>, </s>, <unk>)."""
    trainer = trainers.UnigramTrainer(
        vocab_size=160, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    sp = Tokenizer(models.Unigram())
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sp.train_from_iterator(_SENTENCES * 4, trainer)
    # the trainer's scores vary in their last digits from run to run (and so the order of equal
    # ones): rounded and sorted, every call gives the same vocabulary
    vocab = [(str(p), round(float(s), 2)) for p, s in json.loads(sp.to_str())["model"]["vocab"]]
    return vocab[:3] + sorted(vocab[3:], key=lambda piece: (-piece[1], piece[0]))


def _write_tokenizer_folder(folder: Path, vocab: list[tuple[str, float]]) -> int:
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def _tiny_tokenizer(folder: Path) -> int:
    """The small T5 tokenizer folder of these checkpoints (for benchmarks); returns its size."""
    return _write_tokenizer_folder(folder, _tokenizer_vocab())


def _ctc_vocab(characters: str) -> dict[str, int]:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab.update({c: i + 5 for i, c in enumerate(characters)})
    return vocab


def _save_ctc_extras(out: Path, vocab: dict[str, int]) -> None:
    """What a released Wav2Vec2ForCTC folder holds beside its weights: preprocessor and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    extractor.save_pretrained(str(out))
    Wav2Vec2CTCTokenizer(str(out / "vocab.json")).save_pretrained(str(out))


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised tensors (zero_init output layers, biases) small random values, so every
    path of a small model changes its output and tests exercise all of it."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def write_ctc_folder(out: Path, hidden: int, layers: int, characters: str, seed: int) -> Path:
    """A random Wav2Vec2ForCTC folder shaped like wav2vec2-large-xlsr-53 (stable layer norm, 50 Hz)
    but tiny, with a vocabulary of the special tokens, "|" and `characters` (the CTC aligner's
    tests); saved the way the released folder is (config + weights, preprocessor, vocab/tokenizer)."""
    vocab = _ctc_vocab(characters)
    _save_ctc_extras(out, vocab)
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        conv_dim=(16,) * 7,  # same kernels/strides as the real model: 320 samples per feature
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    Wav2Vec2ForCTC(config).eval().save_pretrained(str(out))
    return out


def write_liveavatar_lora(
    path: str | Path, config: S2VConfig | None = None, rank: int = 4, seed: int = 0, std: float = 0.05
) -> Path:
    """A random LoRA in the layout of LiveAvatar's `liveavatar.safetensors` for the transformer of
    `config` (default tiny): PEFT's `<layer>.lora_A.default.weight` [rank, in] and
    `<layer>.lora_B.default.weight` [out, rank] on every layer LiveAvatar adapts (the q, k, v, o
    and ffn.0 / ffn.2 linears, audio injectors included)."""
    with torch.device("meta"):
        model = WanS2VTransformer(config or S2VConfig.tiny())
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in liveavatar_targets(model).items():
        out_dim, in_dim = module.weight.shape
        tensors[f"{name}.lora_A.default.weight"] = torch.randn(rank, in_dim, generator=generator) * std
        tensors[f"{name}.lora_B.default.weight"] = torch.randn(out_dim, rank, generator=generator) * std
    path = Path(path)
    save_file(tensors, str(path))
    return path
