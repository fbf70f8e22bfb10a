"""The `wan-s2v` generator backend on the tiny checkpoint: a 2-clip segment, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tasks.generate.base import GeneratedClip, Generator
from tasks.generate.wan_s2v import WanS2VGenerator
from tasks.records import Segment, SegmentJob

INFER = 8  # frames per clip (a multiple of 4; small for CPU)
W, H = 64, 64


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> WanS2VGenerator:
    from model.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-s2v"), seed=1)
    return WanS2VGenerator(str(folder), device="cpu")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> SegmentJob:
    root = tmp_path_factory.mktemp("job")
    y, x = np.mgrid[0:H, 0:W]
    face = np.stack([128 + 100 * np.cos(x / 9), 128 + 100 * np.sin(y / 7), (x * y) % 256], axis=-1)
    Image.fromarray(face.astype(np.uint8)).save(root / "ref.png")
    seconds = 2 * INFER / 16  # exactly two clips of video
    t = np.arange(int(16_000 * seconds)) / 16_000
    speech = 0.3 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 5 * t))
    sf.write(root / "seg.wav", speech.astype(np.float32), 16_000, subtype="PCM_16")
    segment = Segment(
        index=0, start_sample=0, end_sample=len(t), start_s=0.0, end_s=seconds, frames=2 * INFER, clips=2, seed=5
    )
    return SegmentJob(
        row_id="r1",
        segment=segment,
        image=str(root / "ref.png"),
        audio=str(root / "seg.wav"),
        prompt="A person talks to the camera.",
        negative_prompt="blurry",
        width=W,
        height=H,
        infer_frames=INFER,
        steps=2,
    )


def test_two_clip_segment_then_bitwise_resume(generator: WanS2VGenerator, job: SegmentJob):
    assert isinstance(generator, Generator) and generator.name == "wan-s2v"
    clips = list(generator.clips(job))
    assert [c.index for c in clips] == [0, 1]
    for clip in clips:
        assert isinstance(clip, GeneratedClip)
        assert clip.frames.shape == (INFER, H, W, 3) and clip.frames.dtype == np.uint8
        assert clip.gpu_s == 0.0  # CPU
    # the reference's first clip has INFER - 3 frames; the 3 dropped ones are held on its first frame
    first = clips[0].frames
    assert all(np.array_equal(first[i], first[3]) for i in range(3))
    assert clips[0].state["motion_frames"].dtype == np.float32

    resumed = list(generator.clips(job, start_clip=1, state=clips[0].state))
    assert [c.index for c in resumed] == [1]
    assert np.array_equal(resumed[0].frames, clips[1].frames)
    assert resumed[0].state.keys() == clips[1].state.keys()
    assert all(np.array_equal(resumed[0].state[k], clips[1].state[k]) for k in clips[1].state)


def test_wrong_audio_rate_is_rejected(generator: WanS2VGenerator, job: SegmentJob, tmp_path: Path):
    bad = tmp_path / "44k.wav"
    sf.write(bad, np.zeros(44_100, dtype=np.float32), 44_100)
    with pytest.raises(ValueError, match=r"44k\.wav.*16000 Hz"):
        next(generator.clips(job.model_copy(update={"audio": str(bad)})))
    with pytest.raises(ValueError, match="16 fps"):
        next(generator.clips(job.model_copy(update={"fps": 25})))


def test_pose_video_is_sampled_at_16_fps_from_the_segment_start(tmp_path: Path):
    import av

    from tasks.generate.wan_s2v import read_pose_video

    path = tmp_path / "pose.mkv"
    with av.open(str(path), "w") as out:  # 25 fps, lossless, frame n is grey level 5 * n
        stream = out.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "bgr0"
        for n in range(40):
            img = np.full((64, 96, 3), 5 * n, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    frames = read_pose_video(str(path), start_s=0.5, frames=20, width=64, height=64)
    # frame i is source frame round((0.5 + i / 16) * 25); the video ends at source frame 39
    expected = [round((0.5 + i / 16) * 25) for i in range(20)]
    kept = [n for n in expected if n < 40]
    assert frames.shape == (len(kept), 64, 64, 3)
    assert [int(f[32, 32, 0]) // 5 for f in frames] == kept
    assert read_pose_video(str(path), start_s=10.0, frames=8, width=64, height=64).shape == (0, 64, 64, 3)


def test_fingerprint_names_precision_and_weight_files(generator: WanS2VGenerator):
    assert generator.fingerprint.startswith("precision=bf16 dtype=torch.float32 dit=official ")
    assert "t5=models_t5_umt5-xxl-enc-bf16.pth" in generator.fingerprint


def test_comfyui_files_render_the_same_clips(generator: WanS2VGenerator, job: SegmentJob, tmp_path_factory):
    """The ComfyUI files of the generator's weights: the same clips, another fingerprint (other files)."""
    from model.tiny import write_tiny_comfyui

    comfy = WanS2VGenerator(str(write_tiny_comfyui(tmp_path_factory.mktemp("comfy"), seed=1)), device="cpu")
    assert comfy.fingerprint != generator.fingerprint and "dit=wan2.2_s2v_14B_bf16.safetensors" in comfy.fingerprint
    for ours, theirs in zip(comfy.clips(job), generator.clips(job), strict=True):
        assert np.array_equal(ours.frames, theirs.frames)


def test_speed_preset_and_loras_per_job(generator: WanS2VGenerator, job: SegmentJob, tmp_path: Path):
    """A job's speed options and LoRAs reach the model; the next job without them renders exactly as
    before (the pool worker serves rows with different LoRAs one after the other)."""
    import torch
    from safetensors.torch import save_file

    from model.presets import preset
    from tasks.records import LoraRef

    exact = list(generator.clips(job))
    assert [c.forwards for c in exact] == [4, 4]  # 2 steps, CFG as a batch of 2
    fast = job.model_copy(update={"preset": "fast", "speed": preset("fast", cfg_steps=1).to_dict(), "steps": 3})
    clips = list(generator.clips(fast))
    assert [c.forwards for c in clips] == [4, 4]  # 3 steps (the row's, under fast's 14), guidance on the first
    resumed = list(generator.clips(fast, start_clip=1, state=clips[0].state))
    assert np.array_equal(resumed[0].frames, clips[1].frames)  # lossless continuation in a preset

    dit = generator.pipeline.transformer
    q = dit.blocks[0].self_attn.q.weight
    lora = tmp_path / "style.safetensors"
    save_file({
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, q.shape[1]),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(q.shape[0], 2),
    }, str(lora))  # fmt: skip
    styled = list(generator.clips(job.model_copy(update={"loras": [LoraRef(path=str(lora), strength=0.5)]})))
    assert not np.array_equal(styled[1].frames, exact[1].frames)
    again = list(generator.clips(job))
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(again, exact, strict=True))

    foreign = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}, str(foreign))
    with pytest.raises(ValueError, match="double_blocks_0_img_attn_qkv"):
        next(generator.clips(job.model_copy(update={"loras": [LoraRef(path=str(foreign))]})))
