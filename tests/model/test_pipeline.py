"""S2VPipeline on the tiny checkpoint: layout errors, input checks, the clip loop and its state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from media import gradient_image, voiced_tone
from PIL import Image

from model.layout import CheckpointError, check_layout
from model.pipeline import TEXT_CACHE, S2VPipeline, prepare_reference

INFER = 8  # frames per clip: a multiple of 4, small to keep CPU tests fast


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path) -> S2VPipeline:
    return S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu")


_image = gradient_image
_speech = voiced_tone


def test_missing_files_are_all_named_with_the_layout(tiny_checkpoint: Path, tmp_path: Path, make_mirror):
    shard = sorted(p.name for p in tiny_checkpoint.glob("diffusion_pytorch_model-*.safetensors"))[1]
    skip = {shard, "Wan2.1_VAE.pth", "wav2vec2-large-xlsr-53-english/preprocessor_config.json"}
    folder = make_mirror(tiny_checkpoint, tmp_path / "ckpt", skip)
    with pytest.raises(CheckpointError) as err:
        S2VPipeline.from_checkpoint(folder)
    message = str(err.value)
    for name in skip:
        assert name in message
    assert "models_t5_umt5-xxl-enc-bf16.pth" in message  # the expected layout is spelled out
    assert check_layout(tiny_checkpoint) == tiny_checkpoint


def test_clip_loop_frames_and_state(pipeline: S2VPipeline):
    # (resuming from the state is tested through the backend, tests/test_wan_s2v_backend.py)
    clips = list(
        pipeline.generate_clips(_image(), _speech(1.0), "a person talks", num_clips=2, infer_frames=INFER, steps=2)
    )
    assert [c.index for c in clips] == [0, 1]
    assert [c.frames.shape for c in clips] == [(INFER - 3, 64, 64, 3), (INFER, 64, 64, 3)]
    assert all(c.frames.dtype == np.uint8 and c.frames.std() > 0 for c in clips)
    s0, s1 = (c.state for c in clips)
    assert s0["motion_frames"].shape == (3, 73, 64, 64) and s0["motion_frames"].dtype == np.float32
    assert s0["motion_latents"].shape == (16, 19, 8, 8) and int(s0["next_clip"]) == 1
    # the carried frames are the last 73 of the video so far (zeros before its first frame), in
    # float: the newest ones agree with the clip's uint8 frames up to quantisation
    assert not s0["motion_frames"][:, : 73 - (INFER - 3)].any()
    for state, clip in ((s0, clips[0]), (s1, clips[1])):
        n = len(clip.frames)
        carried = ((state["motion_frames"][:, -n:] + 1) / 2 * 255).astype(np.uint8).transpose(1, 2, 3, 0)
        assert np.array_equal(carried, clip.frames)
    assert np.array_equal(s1["motion_frames"][:, : 73 - INFER], s0["motion_frames"][:, INFER:])
    assert "motion_latents" not in s1  # nothing follows the last clip


def test_bad_inputs_fail_clearly(pipeline: S2VPipeline):
    audio = _speech(1.0)
    with pytest.raises(ValueError, match="multiples of 16"):
        next(pipeline.generate_clips(_image(64, 72), audio, "p", num_clips=1, infer_frames=INFER, steps=1))
    with pytest.raises(ValueError, match="uint8"):
        next(pipeline.generate_clips(_image().astype(np.float32), audio, "p", num_clips=1, infer_frames=INFER))
    with pytest.raises(ValueError, match="16000 Hz"):
        next(pipeline.generate_clips(_image(), audio, "p", num_clips=1, infer_frames=INFER, sample_rate=8000))
    with pytest.raises(ValueError, match="needs the state"):
        next(pipeline.generate_clips(_image(), audio, "p", num_clips=2, infer_frames=INFER, start_clip=1))
    state = {"motion_frames": np.zeros((3, 73, 64, 64), np.float32), "next_clip": np.array(2)}
    with pytest.raises(ValueError, match="continues at clip 2, not at clip 1"):
        next(pipeline.generate_clips(_image(), audio, "p", num_clips=3, infer_frames=INFER, start_clip=1, state=state))
    state = {"motion_frames": np.zeros((3, 73, 32, 32), np.float32)}
    with pytest.raises(ValueError, match="motion_frames"):
        next(pipeline.generate_clips(_image(), audio, "p", num_clips=2, infer_frames=INFER, start_clip=1, state=state))
    with pytest.raises(ValueError, match="multiple of 4"):
        next(pipeline.generate_clips(_image(), audio, "p", num_clips=1, infer_frames=10))


def test_prepare_reference_resizes_short_side_and_centre_crops():
    wide = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))
    out = prepare_reference(wide, 64, 64)  # 200x100 -> 128x64, then the middle 64 columns
    assert out.shape == (64, 64, 3)
    assert abs(int(out[0, 0, 0]) - 50) <= 2 and abs(int(out[0, -1, 0]) - 149) <= 2
    same = _image(64, 96)
    assert np.array_equal(prepare_reference(same, 64, 96), same)


def test_pose_video_drives_the_pose_condition(pipeline: S2VPipeline):
    args = (_image(), _speech(0.5), "a person talks")
    kw = {"num_clips": 1, "infer_frames": INFER, "steps": 1, "seed": 3}
    plain = next(pipeline.generate_clips(*args, **kw))
    pose = np.zeros((INFER // 2, 64, 64, 3), np.uint8)  # shorter than the clip: padded with -1
    pose[:, 20:44, 28:36] = 255
    posed = next(pipeline.generate_clips(*args, **kw, pose=pose))
    assert posed.frames.shape == plain.frames.shape
    assert not np.array_equal(posed.frames, plain.frames)
    with pytest.raises(ValueError, match=r"pose video must be uint8 \[T, 64, 64, 3\]"):
        next(pipeline.generate_clips(*args, **kw, pose=np.zeros((4, 32, 32, 3), np.uint8)))


def test_prompt_embeddings_are_kept_for_the_next_segments(pipeline: S2VPipeline):
    # A batch's segments share their prompts: the umT5 embedding is computed once and reused as is
    # (with offload, umT5 then stays in host memory), the oldest dropped past TEXT_CACHE prompts.
    fresh = pipeline._pad_text(pipeline.text_encoder.encode(["a teacher explains"])[0])
    first, negative = pipeline._text_contexts(["a teacher explains", "blurry"])
    assert torch.equal(first, fresh)
    again, negative_again = pipeline._text_contexts(["a teacher explains", "blurry"])
    assert again is first and negative_again is negative
    pipeline._text_contexts([f"prompt {i}" for i in range(TEXT_CACHE)])
    assert pipeline._text_contexts(["a teacher explains"])[0] is not first
    assert len(pipeline._text_cache) == TEXT_CACHE
