"""A tiny Wan2.2-S2V checkpoint with random weights, written in the official folder layout.

`write_tiny_checkpoint(folder)` builds every component of the real model with tiny sizes and
writes each one exactly as the released checkpoint stores it, so tests and CI load it through the
same code as the 30 GB original and generate real (noise-valued) clips on CPU in seconds:

    config.json + diffusion_pytorch_model-0000K-of-0000N.safetensors + .index.json   (the DiT)
    models_t5_umt5-xxl-enc-bf16.pth      (umT5 encoder in Wan's T5 naming, bf16)
    google/umt5-xxl/                     (a Unigram tokenizer trained here on a few sentences)
    Wan2.1_VAE.pth                       (the Wan2.1 VAE in Wan's naming, narrow channels)
    wav2vec2-large-xlsr-53-english/      (a Wav2Vec2ForCTC folder: config, weights, processor)

Nothing is downloaded; the tokenizer is trained offline with the `tokenizers` library.
"""

from __future__ import annotations

import json
from pathlib import Path

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

from model.checkpoint import save_official_dit
from model.config import S2VConfig
from model.distilled import liveavatar_targets
from model.layout import T5_CHECKPOINT, T5_TOKENIZER, VAE_CHECKPOINT, WAV2VEC_DIR
from model.text_encoder import hf_to_wan_t5
from model.transformer import WanS2VTransformer, randomize_
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


def _tiny_tokenizer(folder: Path) -> int:
    """Train a small Unigram vocabulary and save it as a T5 tokenizer folder; returns its size."""
    trainer = trainers.UnigramTrainer(
        vocab_size=160, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    sp = Tokenizer(models.Unigram())
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sp.train_from_iterator(_SENTENCES * 4, trainer)
    pieces = json.loads(sp.to_str())["model"]["vocab"]  # [[piece, log-prob], ...], specials first
    vocab = [(str(p), float(s)) for p, s in pieces]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised tensors (zero_init output layers, biases) small random values, so every
    path of the tiny model changes its output and tests exercise all of it."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def write_t5(folder: Path, text_dim: int, generator: torch.Generator) -> None:
    vocab = _tiny_tokenizer(folder / T5_TOKENIZER)
    config = UMT5Config(
        vocab_size=vocab + 8,
        d_model=text_dim,
        d_kv=text_dim // 2,
        d_ff=text_dim * 2,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = UMT5EncoderModel(config)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in hf_to_wan_t5(model.state_dict()).items()}
    torch.save(state, folder / T5_CHECKPOINT)


def write_vae(folder: Path, generator: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = AutoencoderKLWan(**TINY_VAE)
    _randomize(model, generator)
    state = diffusers_to_wan_vae(model.state_dict(), TINY_VAE["num_res_blocks"])
    torch.save({k: v.contiguous() for k, v in state.items()}, folder / VAE_CHECKPOINT)


def write_wav2vec(folder: Path, hidden: int, layers: int, generator: torch.Generator) -> None:
    """The checkpoint's wav2vec2 folder, tiny (see write_ctc_folder)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    write_ctc_folder(folder / WAV2VEC_DIR, hidden, layers, "abcdefghijklmnopqrstuvwxyz'", seed)


def write_ctc_folder(out: Path, hidden: int, layers: int, characters: str, seed: int) -> Path:
    """A random Wav2Vec2ForCTC folder shaped like wav2vec2-large-xlsr-53 (stable layer norm, 50 Hz)
    but tiny, with a vocabulary of the special tokens, "|" and `characters`; saved the way the
    released folder is (config + weights, preprocessor_config.json, vocab/tokenizer files)."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab.update({c: i + 5 for i, c in enumerate(characters)})
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
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
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    extractor.save_pretrained(str(out))
    Wav2Vec2CTCTokenizer(str(out / "vocab.json")).save_pretrained(str(out))
    return out


def write_dit(folder: Path, config: S2VConfig, generator: torch.Generator, max_shard_bytes: int) -> None:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = WanS2VTransformer(config)
    # every parameter perturbed, so zero-initialised paths (audio injection outputs) are live
    randomize_(model, seed=int(torch.randint(0, 2**31, (1,), generator=generator)))
    save_official_dit(model, folder, max_shard_bytes=max_shard_bytes)


def write_tiny_checkpoint(folder: str | Path, seed: int = 0, max_shard_bytes: int = 200_000) -> Path:
    """Write a complete tiny S2V checkpoint (official layout, random weights) into `folder`.

    The DiT is split into several shards (`max_shard_bytes`) so the index is exercised too.
    Deterministic for a given seed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = S2VConfig.tiny()
    generator = torch.Generator().manual_seed(seed)
    rng_state = torch.random.get_rng_state()
    try:
        write_dit(folder, config, generator, max_shard_bytes)
        write_t5(folder, config.text_dim, generator)
        write_vae(folder, generator)
        write_wav2vec(folder, config.audio_dim, config.audio_num_layers - 1, generator)
    finally:
        torch.random.set_rng_state(rng_state)  # leave the caller's global RNG as it was
    return folder


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
