"""LoRAs on the tiny transformer: every key style changes the forward exactly as a hand-merged model
does, several at once, switching restores the base bit for bit, fp8 layers get them unmerged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import quantize_linears_fp8
from model.lora import LoraError, active_loras, load_lora, set_loras
from model.offload import stream_blocks

RANK = 4
# (our module path, diffusers' name) of the layers the test LoRAs touch: attention and FFN
# linears of two blocks, the text embedding, and an audio injector
LAYERS = [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
    ("blocks.0.self_attn.o", "blocks.0.attn1.to_out.0"),
    ("blocks.1.cross_attn.k", "blocks.1.attn2.to_k"),
    ("blocks.1.ffn.0", "blocks.1.ffn.net.0.proj"),
    ("blocks.2.ffn.2", "blocks.2.ffn.net.2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("audio_injector.injector.0.v", None),
]


def _factors(model, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{our layer: (down [r, in], up [out, r], alpha)} with random values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (layer, _) in enumerate(LAYERS):
        weight = model.get_submodule(layer).weight
        down = torch.randn(RANK, weight.shape[1], generator=gen) * 0.1
        up = torch.randn(weight.shape[0], RANK, generator=gen) * 0.1
        out[layer] = (down, up, float(2 + i))
    return out


def _write(style: str, factors: dict, path: Path) -> Path:
    """The factors saved under the key names of `style`."""
    tensors: dict[str, torch.Tensor] = {}
    diffusers = dict(LAYERS)
    for layer, (down, up, alpha) in factors.items():
        if style == "kohya":
            stem = "lora_unet_" + layer.replace(".", "_")
            tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        elif style == "comfyui":
            stem = "diffusion_model." + layer
            tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        elif style == "peft":  # diffusers' names where it has them; alpha as diffusers' converters keep it
            stem = "transformer." + (diffusers[layer] or layer)
            tensors |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
        if style != "diffsynth":
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        else:  # PEFT adapter keys as DiffSynth's trainer saves them: no alpha
            tensors |= {f"{layer}.lora_A.default.weight": down, f"{layer}.lora_B.default.weight": up}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _hand_merged(model, factors_list: list[tuple[dict, float, bool]]):
    """A copy of `model` with W += strength * scale * up @ down written out by hand (float32)."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for factors, strength, has_alpha in factors_list:
            for layer, (down, up, alpha) in factors.items():
                scale = alpha / RANK if has_alpha else 1.0
                merged.get_submodule(layer).weight += strength * scale * (up @ down)
    return merged


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("style", ["kohya", "comfyui", "peft", "diffsynth"])
def test_each_key_style_matches_a_hand_merged_model(style, tiny_dit, dit_inputs, tmp_path):
    model = copy.deepcopy(tiny_dit)
    base_out = model(**dit_inputs)
    factors = _factors(model, seed=1)
    lora = load_lora(_write(style, factors, tmp_path / f"{style}.safetensors"), model)
    assert lora.style == style and len(lora.deltas) == len(LAYERS)

    expected = _hand_merged(model, [(factors, 0.7, style != "diffsynth")])(**dit_inputs)
    set_loras(model, [(lora, 0.7)])
    got = model(**dit_inputs)
    assert _max_err(got, expected) <= 1e-6
    assert _max_err(got, base_out) > 1e-3  # the LoRA does change the output

    set_loras(model, [])  # back to the base weights, bit for bit
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_dit.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(model(**dit_inputs), base_out)


def test_several_loras_and_switching(tiny_dit, dit_inputs, tmp_path):
    model = copy.deepcopy(tiny_dit)
    fa, fb = _factors(model, seed=2), _factors(model, seed=3)
    a = load_lora(_write("kohya", fa, tmp_path / "a.safetensors"), model)
    b = load_lora(_write("peft", fb, tmp_path / "b.safetensors"), model)
    both = _hand_merged(model, [(fa, 0.5, True), (fb, -1.2, True)])(**dit_inputs)
    only_b = _hand_merged(model, [(fb, 1.0, True)])(**dit_inputs)

    set_loras(model, [(a, 0.5), (b, -1.2)])
    assert _max_err(model(**dit_inputs), both) <= 1e-6
    assert active_loras(model) == ((a.path, 0.5), (b.path, -1.2))
    set_loras(model, [(b, 1.0)])  # another row: starts again from the base weights
    assert _max_err(model(**dit_inputs), only_b) <= 1e-6
    set_loras(model, [(a, 0.5), (b, -1.2)])
    assert _max_err(model(**dit_inputs), both) <= 1e-6
    set_loras(model, [])
    assert _same_weights(model, tiny_dit)


def test_unmerged_layers_match_merged(tiny_dit, dit_inputs, tmp_path):
    model = copy.deepcopy(tiny_dit)
    factors = _factors(model, seed=4)
    lora = load_lora(_write("comfyui", factors, tmp_path / "c.safetensors"), model)
    expected = _hand_merged(model, [(factors, 0.9, True)])(**dit_inputs)
    set_loras(model, [(lora, 0.9)], merge=False)  # beside the weights, as for fp8 layers
    assert type(model.get_submodule("blocks.0.self_attn.q")).__name__ == "LoraLinear"
    assert _max_err(model(**dit_inputs), expected) <= 1e-6
    set_loras(model, [])
    assert type(model.get_submodule("blocks.0.self_attn.q")) is torch.nn.Linear
    assert torch.equal(model(**dit_inputs), tiny_dit(**dit_inputs))


def test_fp8_layers_get_the_lora_unmerged(tiny_dit, dit_inputs, tmp_path):
    model = copy.deepcopy(tiny_dit)
    quantize_linears_fp8(model)  # block linears in fp8 (dequantized on CPU), the rest float32
    fp8_base = model(**dit_inputs)
    fp8_weights = {k: v.clone() for k, v in model.state_dict().items()}
    factors = _factors(model, seed=5)
    lora = load_lora(_write("comfyui", factors, tmp_path / "f.safetensors"), model)
    set_loras(model, [(lora, 1.0)])
    assert type(model.get_submodule("blocks.0.self_attn.q")).__name__ == "LoraLinear"  # fp8: beside
    assert type(model.get_submodule("text_embedding.0")) is torch.nn.Linear  # float32: merged
    # against the same model with float weights: the fp8 layers run in bf16 on CPU, hence the tolerance
    reference = copy.deepcopy(tiny_dit)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "dequantized_weight") and not hasattr(module, "base"):  # the Fp8Linear itself
                reference.get_submodule(name.removesuffix(".base")).weight.copy_(module.dequantized_weight())
    expected = _hand_merged(reference, [(factors, 1.0, True)])(**dit_inputs)
    got = model(**dit_inputs)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 2e-2 and _max_err(got, fp8_base) > 1e-3
    set_loras(model, [])
    assert all(torch.equal(v, fp8_weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(**dit_inputs), fp8_base)


def test_streamed_blocks_see_the_changed_weights(tiny_dit, dit_inputs, tmp_path):
    model = copy.deepcopy(tiny_dit)
    factors = _factors(model, seed=6)
    lora = load_lora(_write("kohya", factors, tmp_path / "s.safetensors"), model)
    expected = _hand_merged(model, [(factors, 1.0, True)])(**dit_inputs)
    base_out = model(**dit_inputs)
    streamer = stream_blocks(model, "cpu")
    model(**dit_inputs)  # the streamer now holds blocks in its slots
    set_loras(model, [(lora, 1.0)])
    assert _max_err(model(**dit_inputs), expected) <= 1e-6
    set_loras(model, [])
    assert torch.equal(model(**dit_inputs), base_out)
    streamer.remove()


def test_a_lora_for_another_model_names_its_keys(tiny_dit, tmp_path):
    model = copy.deepcopy(tiny_dit)
    other = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(64, 4),
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(64, 4),
    }
    save_file(other, str(tmp_path / "flux.safetensors"))
    with pytest.raises(LoraError, match=r"2 key\(s\) match no layer.*double_blocks_0_img_attn_qkv") as err:
        load_lora(tmp_path / "flux.safetensors", model)
    assert "flux.safetensors" in str(err.value)

    wrong_shape = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 4),
    }
    save_file(wrong_shape, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(LoraError, match=r"do not fit the weight blocks.0.self_attn.q.weight"):
        load_lora(tmp_path / "narrow.safetensors", model)
    save_file({"some.thing": torch.zeros(2)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(LoraError, match="no known key style"):
        load_lora(tmp_path / "none.safetensors", model)
    with pytest.raises(LoraError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", model)


def test_full_differences_and_bias(tiny_dit, dit_inputs, tmp_path):
    """ComfyUI's `.diff` / `.diff_b` keys (full weight and bias differences), on a plain parameter too."""
    model = copy.deepcopy(tiny_dit)
    gen = torch.Generator().manual_seed(7)
    q = model.get_submodule("blocks.0.self_attn.q")
    diff = torch.randn(q.weight.shape, generator=gen) * 0.05
    diff_b = torch.randn(q.bias.shape, generator=gen) * 0.05
    mod = torch.randn(model.blocks[1].modulation.shape, generator=gen) * 0.05
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.diff": diff,
            "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b,
            "diffusion_model.blocks.1.modulation.diff": mod,
        },
        str(tmp_path / "diff.safetensors"),
    )
    lora = load_lora(tmp_path / "diff.safetensors", model)
    expected = copy.deepcopy(model)
    with torch.no_grad():
        expected.blocks[0].self_attn.q.weight += 0.5 * diff
        expected.blocks[0].self_attn.q.bias += 0.5 * diff_b
        expected.blocks[1].modulation += 0.5 * mod
    set_loras(model, [(lora, 0.5)])
    assert _max_err(model(**dit_inputs), expected(**dit_inputs)) <= 1e-6
    set_loras(model, [])
    assert _same_weights(model, tiny_dit)
