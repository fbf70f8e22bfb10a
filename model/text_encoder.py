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

ComfyUI's `umt5_xxl_fp8_e4m3fn_scaled.safetensors` (or `umt5_xxl_fp16.safetensors`) keeps the
encoder in transformers' names (`shared.weight`, `encoder.block.i...`; model/comfy.py); its
scaled-fp8 linear weights are dequantized to `dtype` (bf16) at load, on the device (the fp8 matmul
path is kept for the DiT, where the time is), and it is renamed to Wan's layout and loaded as
above. Its tokenizer is embedded in the file (`spiece_model`, a sentencepiece model): the same
pieces and scores are made into transformers' T5 tokenizer (`tokenizer_from_spiece`).

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
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Tokenizer, UMT5Config, UMT5EncoderModel
from transformers.convert_slow_tokenizer import import_protobuf

from model import comfy
from model.checkpoint import build_on_meta
from model.layout import CheckpointError
from model.timing import LoadTimings, phase

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


def load_t5_state(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                  ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The encoder in Wan's naming: the official .pth memory-mapped (read when used), or a
    ComfyUI .safetensors read onto `device` (scaled fp8 dequantized to `dtype`) and renamed."""
    try:
        if path.suffix == ".safetensors":
            hf = comfy.read_state(path, device, dtype)
            hf.pop(comfy.SPIECE_MODEL, None)
            hf.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight where present
            try:
                return hf_to_wan_t5(hf)
            except KeyError as exc:
                raise CheckpointError(f"{path}: unexpected key {exc} for a umT5 encoder") from None
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt/truncated zip or safetensors, not a tensor pickle, ...
        raise CheckpointError(f"{path}: cannot read the T5 encoder checkpoint ({exc}); download it again") from exc
    if not isinstance(state, dict) or "token_embedding.weight" not in state:
        raise CheckpointError(
            f"{path}: not a Wan umt5 encoder state dict (expected keys 'token_embedding.weight', "
            "'blocks.N.attn.q.weight', ..., 'norm.weight')"
        )
    return state


def spiece_model_bytes(vocab: Sequence[tuple[str, float]], unk_id: int = 2) -> bytes:
    """A sentencepiece Unigram model (serialized ModelProto) of `vocab` [(piece, log-prob)], the
    form ComfyUI embeds in its umT5 file; pieces before `unk_id` are control tokens (<pad>, </s>)."""
    proto = import_protobuf().ModelProto()
    types = proto.SentencePiece.Type
    for i, (piece, score) in enumerate(vocab):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = types.UNKNOWN if i == unk_id else types.CONTROL if i < unk_id else types.NORMAL
    proto.trainer_spec.model_type = proto.trainer_spec.UNIGRAM
    proto.trainer_spec.unk_id, proto.trainer_spec.pad_id, proto.trainer_spec.eos_id = unk_id, 0, 1
    proto.trainer_spec.bos_id = -1
    proto.normalizer_spec.name = "identity"
    return proto.SerializeToString()


def tokenizer_from_spiece(data: bytes) -> T5Tokenizer:
    """transformers' T5 tokenizer with the pieces, scores and normalizer of a sentencepiece model
    (read with protobuf, so the sentencepiece package is not needed)."""
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(data)
    if proto.trainer_spec.unk_id != 2 or len(proto.pieces) < 3:
        raise ValueError(f"a T5 sentencepiece model has <unk> at id 2, this one at {proto.trainer_spec.unk_id}")
    vocab = [(p.piece, p.score) for p in proto.pieces]
    charsmap = proto.normalizer_spec.precompiled_charsmap or None
    return T5Tokenizer(vocab=vocab, extra_ids=0, pad_token=vocab[0][0], eos_token=vocab[1][0],
                       unk_token=vocab[2][0], _spm_precompiled_charsmap=charsmap)  # fmt: skip


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer from a tokenizer folder or from the ComfyUI umT5 file that embeds it."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                if comfy.SPIECE_MODEL not in f.keys():  # noqa: SIM118 - not iterable
                    raise ValueError(f"no embedded tokenizer ('{comfy.SPIECE_MODEL}')")
                data = f.get_tensor(comfy.SPIECE_MODEL).numpy().tobytes()
            return tokenizer_from_spiece(data)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load the umT5 tokenizer ({exc}); use google/umt5-xxl/ from the "
                              "official Wan2.2-S2V-14B folder") from exc  # fmt: skip


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, source: Path, vocab_rows: int, checkpoint: Path) -> None:
    """CheckpointError unless the tokenizer's ids fit the encoder's embedding (same model family)."""
    fix = "use umT5's tokenizer: google/umt5-xxl/ of the official Wan2.2-S2V-14B folder, or ComfyUI's umT5 file"
    if len(tokenizer) > vocab_rows:
        raise CheckpointError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the text encoder {checkpoint.name} embeds "
            f"only {vocab_rows}: a tokenizer of another model; {fix}"
        )
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise CheckpointError(f"{source}: the tokenizer has no end or padding token (not a T5 tokenizer); {fix}")


def _embedding_rows(checkpoint: Path) -> int:
    """Rows of a ComfyUI umT5 file's token embedding, from its header."""
    try:
        return comfy.header(checkpoint)["shared.weight"][1][0]
    except (SafetensorError, OSError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint}: not a readable umT5 encoder file ({exc}); download it again") from exc


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
        tokenizer: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = TEXT_LEN,
        timings: LoadTimings | None = None,
    ) -> TextEncoder:
        """Load the encoder (Wan's .pth or ComfyUI's .safetensors) and the tokenizer (a folder, or
        the ComfyUI umT5 file that embeds it); local paths, nothing is downloaded. The tokenizer is
        checked against the encoder's embedding before any weight is read."""
        checkpoint, tokenizer_src = Path(checkpoint), Path(tokenizer)
        with phase(timings, "build"):
            tok = load_tokenizer(tokenizer_src)
        if checkpoint.suffix == ".safetensors":  # the header says the embedding's size; then read
            check_tokenizer(tok, tokenizer_src, _embedding_rows(checkpoint), checkpoint)
            with phase(timings, "read", device):
                state = load_t5_state(checkpoint, device, dtype)
        else:  # memory-mapped: little is read before the model moves to the device
            with phase(timings, "read"):
                state = load_t5_state(checkpoint)
            check_tokenizer(tok, tokenizer_src, int(state["token_embedding.weight"].shape[0]), checkpoint)
        with phase(timings, "build", device):
            try:
                config = umt5_config_from_wan(state)
                hf_state = wan_to_hf_t5(state)
            except KeyError as exc:
                raise CheckpointError(f"{checkpoint}: unexpected key {exc} for a Wan umt5 encoder") from exc
            model = build_on_meta(lambda: UMT5EncoderModel(config), hf_state, checkpoint, "a umt5 encoder")
            # One embedding, as in the checkpoint: without the tie `.to()` makes two 2 GiB copies.
            model.encoder.embed_tokens = model.shared
        with phase(timings, "read", device):  # the memory-mapped .pth is read here
            model = model.to(device=device, dtype=dtype)
        return cls(model, tok, text_len)

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
