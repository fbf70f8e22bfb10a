"""umt5-xxl text encoder: the official Wan checkpoint run through transformers' UMT5EncoderModel.

The official `models_t5_umt5-xxl-enc-bf16.pth` holds the encoder in Wan's own module naming
(`wan/modules/t5.py`). We rename its keys to transformers' layout at load and infer the size
from the tensors' shapes, so the same code loads the 5.7B-parameter original and the tiny test
checkpoint. Key mapping (Wan -> transformers), `i` the block index:

    token_embedding.weight                 -> shared.weight (and the tied encoder.embed_tokens.weight)
    blocks.i.norm1.weight                  -> encoder.block.i.layer.0.layer_norm.weight
    blocks.i.attn.{q,k,v,o}.weight         -> encoder.block.i.layer.0.SelfAttention.{q,k,v,o}.weight
    blocks.i.pos_embedding.embedding.weight-> encoder.block.i.layer.0.SelfAttention.relative_attention_bias.weight
    blocks.i.norm2.weight                  -> encoder.block.i.layer.1.layer_norm.weight
    blocks.i.ffn.gate.0.weight             -> encoder.block.i.layer.1.DenseReluDense.wi_0.weight  (GELU branch)
    blocks.i.ffn.fc1.weight                -> encoder.block.i.layer.1.DenseReluDense.wi_1.weight  (linear branch)
    blocks.i.ffn.fc2.weight                -> encoder.block.i.layer.1.DenseReluDense.wo.weight
    norm.weight                            -> encoder.final_layer_norm.weight

Both implementations compute the same function: unscaled attention with a per-layer bidirectional
relative position bias (32 buckets, max distance 128), T5 RMS norm (eps 1e-6) and a gated
tanh-GELU feed-forward. Like the reference, prompts are cleaned (ftfy + HTML unescape + whitespace),
tokenized to `text_len` (512) with padding masked out, and each prompt's embeddings are cut to
its real token count; the DiT pads them back with zeros.
"""

from __future__ import annotations

import html
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from model.layout import CheckpointError

TEXT_LEN = 512

_BLOCK_RENAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_RENAMES_BACK = {v: k for k, v in _BLOCK_RENAMES.items()}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def wan_to_hf_t5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan-layout T5 encoder state dict to transformers' UMT5EncoderModel names.

    Raises KeyError naming the first key that belongs to neither layout.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _BLOCK_KEY.match(key)) and m.group(2) in _BLOCK_RENAMES:
            out[f"encoder.block.{m.group(1)}.{_BLOCK_RENAMES[m.group(2)]}"] = value
        else:
            raise KeyError(key)
    return out


def hf_to_wan_t5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `wan_to_hf_t5` (used to write test checkpoints in the official layout)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif (m := _HF_BLOCK_KEY.match(key)) and m.group(2) in _BLOCK_RENAMES_BACK:
            out[f"blocks.{m.group(1)}.{_BLOCK_RENAMES_BACK[m.group(2)]}"] = value
        else:
            raise KeyError(key)
    return out


def umt5_config_from_wan(state: dict[str, torch.Tensor]) -> UMT5Config:
    """The UMT5 encoder configuration implied by a Wan-layout state dict's shapes."""
    vocab, dim = state["token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    dim_attn = state["blocks.0.attn.q.weight"].shape[0]
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    return UMT5Config(
        vocab_size=int(vocab),
        d_model=int(dim),
        d_kv=int(dim_attn) // int(heads),
        d_ff=int(state["blocks.0.ffn.fc1.weight"].shape[0]),
        num_layers=layers,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: fix mojibake, unescape HTML twice, collapse spaces."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_t5_state(path: Path) -> dict[str, torch.Tensor]:
    """Read the official .pth (weights only, memory-mapped) and check it is a Wan T5 encoder."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt/truncated zip, not a tensor pickle, ...
        raise CheckpointError(f"{path}: cannot read the T5 encoder checkpoint ({exc})") from exc
    if not isinstance(state, dict) or "token_embedding.weight" not in state:
        raise CheckpointError(
            f"{path}: not a Wan umt5 encoder state dict (expected keys 'token_embedding.weight', "
            "'blocks.N.attn.q.weight', ..., 'norm.weight')"
        )
    return state


class TextEncoder:
    """Prompt -> per-token umt5 embeddings, as the DiT's cross-attention takes them."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        text_len: int = TEXT_LEN,
        cache_size: int = 8,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        # Segments of one row share their prompts; keep the last few encodings (on CPU).
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        tokenizer_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = TEXT_LEN,
    ) -> TextEncoder:
        """Load the Wan-layout .pth and the tokenizer folder (local paths; nothing is downloaded)."""
        checkpoint, tokenizer_dir = Path(checkpoint), Path(tokenizer_dir)
        state = load_t5_state(checkpoint)
        try:
            config = umt5_config_from_wan(state)
            hf_state = wan_to_hf_t5(state)
        except KeyError as exc:
            raise CheckpointError(f"{checkpoint}: unexpected key {exc} for a Wan umt5 encoder") from exc
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        try:
            model.load_state_dict(hf_state, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint}: does not match a umt5 encoder: {exc}") from exc
        # One embedding, as in the checkpoint: without the tie `.to()` makes two 2 GiB copies.
        model.encoder.embed_tokens = model.shared
        model = model.to(device=device, dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"{tokenizer_dir}: cannot load the umt5 tokenizer ({exc})") from exc
        if len(tokenizer) > config.vocab_size:
            raise CheckpointError(
                f"{tokenizer_dir}: tokenizer has {len(tokenizer)} tokens but {checkpoint} embeds only "
                f"{config.vocab_size}"
            )
        return cls(model, tokenizer, text_len)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def to(self, device: torch.device | str) -> TextEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One [tokens_i, dim] tensor per prompt (padding cut off), on the model's device."""
        out: list[torch.Tensor | None] = [self._cache.get(p) for p in prompts]
        todo = [i for i, t in enumerate(out) if t is None]
        if todo:
            batch = self.tokenizer(
                [clean_prompt(prompts[i]) for i in todo],
                padding="max_length",
                truncation=True,
                max_length=self.text_len,
                add_special_tokens=True,
                return_tensors="pt",
            )
            ids = batch.input_ids.to(self.device)
            mask = batch.attention_mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for row, i in enumerate(todo):
                emb = hidden[row, : int(mask[row].sum())]
                out[i] = emb
                self._cache[prompts[i]] = emb.detach().cpu()
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return [t.to(self.device) for t in out]  # type: ignore[union-attr]
