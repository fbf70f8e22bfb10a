"""Ulysses sequence parallelism for the S2V DiT: one forward spread over the ranks of a process group.

    dist.init_process_group(...)                     # every rank holds the whole model
    sp = sequence_parallel(model)                    # the world group, or group=...
    model(...)                                       # as usual, on every rank, same inputs
    sp.remove()                                      # back to the single-process model

Every rank runs the whole forward on the same inputs up to the blocks (patch embedding, RoPE
table, time and audio embeddings: cheap next to the blocks) and after them (head, unpatchify), so
every rank returns the full velocity and the sampler, the VAE and the rest of the pipeline run
unchanged on each rank. Only the blocks are split: the token sequence
``[video | reference | motion]`` of length S is cut into P contiguous shards (sizes differing by
at most one token; S need not divide by P) and each rank keeps its own shard through all blocks:

- self-attention: q, k and v of the shard (RoPE already applied with the shard's own rows of the
  table) go through one all-to-all that turns "my tokens, all heads" into "all tokens, my H/P
  heads"; the attention runs over the whole sequence for those heads; a second all-to-all turns
  the result back into "my tokens, all heads" before the output projection. The number of heads
  must therefore divide by P (40 heads in the 14B model: P in 1, 2, 4, 5, 8, 10, 20, 40);
- modulation: the token groups (video at t, reference and motion at 0) are cut to the shard;
- cross-attention to the text, feed-forward and norms are per token: they run on the shard;
- audio injection: each video token cross-attends to its own latent frame's audio tokens, per
  token, so the shard's video tokens are injected locally (a frame cut by a shard border is
  completed with zeros whose results are dropped); the official code gathers the whole
  sequence before each injection and splits it again after, which this avoids;
- after the last block the shards are gathered (all-gather) into the full sequence for the head.

Attention exchanges 4 x B x S x D values per block and rank (q, k, v there, the output back),
as in the official `xdit_context_parallel` / DiffSynth-Studio's `usp` code; the weights are
replicated (activations are sharded, not weights). Written here because the official version
lives inside the model's forward as `use_context_parallel` flags, and diffusers' context-parallel
hooks need its own attention dispatcher and model classes; this one is a pair of hooks applied
from outside, as model/offload.py applies block streaming: the self-attention's `attend_hook` and
the model's `run_blocks`, replaced on the instance as diffusers' hooks replace a module's forward.

CFG parallel (`parallel_groups(cfg=True)`, `parallelize(pipe, groups)`): the world splits into
two halves, the first running the conditional branch of every guided step, the second the
unconditional one, each half sequence parallel over its own ranks; rank r and rank r + W/2 form a
pair that exchanges its two velocities (one all-gather a step) and guides, so every rank again
holds the same result. The branches then run as two batch-1 forwards, as `cfg_batch=False` does.

Not sharded (refused with a clear error): the causal streaming model's KV caches
(model/causal.py), which keep keys per rank in a layout this does not split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from model.attention import Attention, KVHook, attend
from model.transformer import TokenGroups, WanS2VTransformer

__all__ = [
    "CfgParallel",
    "ParallelGroups",
    "SequenceParallel",
    "check_heads",
    "parallel_groups",
    "parallelize",
    "sequence_parallel",
    "shard_bounds",
]


def shard_bounds(length: int, ranks: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's shard of a `length`-token sequence: contiguous, in rank order,
    sizes differing by at most one (the first `length % ranks` shards one token longer)."""
    base, extra = divmod(length, ranks)
    bounds, start = [], 0
    for r in range(ranks):
        end = start + base + (r < extra)
        bounds.append((start, end))
        start = end
    return bounds


def check_heads(num_heads: int, ranks: int) -> None:
    """Raise ValueError unless `num_heads` splits evenly over `ranks` (Ulysses gives each rank H/P heads)."""
    if ranks < 1 or num_heads % ranks:
        fits = [p for p in range(1, num_heads + 1) if num_heads % p == 0]
        raise ValueError(
            f"sequence parallel over {ranks} ranks: the model's {num_heads} attention heads must divide by the "
            f"number of ranks (Ulysses gives each rank an equal share of the heads); use one of {fits}"
        )


class SequenceParallel:
    """Hooks that run `model`'s blocks on one shard of the token sequence per rank of `group`;
    see the module docstring. `remove()` restores the single-process model."""

    def __init__(self, model: WanS2VTransformer, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("sequence parallel needs torch.distributed initialised (dist.init_process_group)")
        if getattr(model, "_sequence_parallel", None) is not None:
            raise ValueError("this model is already sequence parallel")
        self.model = model
        self.group = group if group is not None else dist.group.WORLD
        self.ranks = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        check_heads(model.config.num_heads, self.ranks)
        self._bounds: list[tuple[int, int]] = []  # the current forward's shards
        self._attentions: list[Attention] = [block.self_attn for block in model.blocks]
        for attn in self._attentions:
            attn.attend_hook = self.attend
        model.run_blocks = self.run_blocks  # shadows the class's method on this instance
        model._sequence_parallel = self

    def remove(self) -> None:
        """Unhook: the model runs whole sequences in this process again."""
        for attn in self._attentions:
            attn.attend_hook = None
        del self.model.run_blocks
        self.model._sequence_parallel = None

    # ---- the two all-to-alls around the attention ---------------------------------------------
    @torch.compiler.disable  # collectives stay outside compiled block graphs (a graph break each)
    def attend(self, q: Tensor, k: Tensor, v: Tensor, kernel: str) -> Tensor:
        """q, k, v [B, s, H, D] of this rank's tokens -> attention output [B, s, H, D] of the same
        tokens, computed over the whole sequence for H/P heads here and exchanged back."""
        b, s, h, d = q.shape
        p = self.ranks
        sizes = [end - start for start, end in self._bounds]
        if s != sizes[self.rank]:
            raise RuntimeError(f"sequence parallel: {s} local tokens, expected {sizes[self.rank]} (rank {self.rank})")
        # [P (head group), s, 3, B, H/P, D]: the chunk for rank j holds this rank's tokens of j's heads
        send = torch.stack([q, k, v]).view(3, b, s, p, h // p, d).permute(3, 2, 0, 1, 4, 5).contiguous()
        recv = send.new_empty(sum(sizes), 3, b, h // p, d)
        dist.all_to_all_single(recv, send.flatten(0, 1), sizes, [s] * p, group=self.group)
        q_all, k_all, v_all = recv.permute(1, 2, 0, 3, 4).unbind(0)  # each [B, S, H/P, D], tokens in order
        out = attend(q_all, k_all, v_all, kernel)
        back = out.transpose(0, 1).contiguous()  # [S, B, H/P, D], rank j's tokens first j-th
        mine = back.new_empty(p * s, b, h // p, d)
        dist.all_to_all_single(mine, back, [s] * p, sizes, group=self.group)
        return mine.view(p, s, b, h // p, d).permute(2, 1, 0, 3, 4).reshape(b, s, h, d)

    # ---- the blocks on a shard ----------------------------------------------------------------
    def run_blocks(
        self,
        x: Tensor,
        ctx: Tensor,
        temb: TokenGroups,
        rope: Tensor,
        frame_tokens: int,
        audio: tuple[Tensor | None, Tensor] | None,
        kv_caches: list[KVHook] | None = None,
    ) -> Tensor:
        """WanS2VTransformer.run_blocks with x [B, S, D] split over the group; returns the full x."""
        model = self.model
        if kv_caches is not None:
            raise ValueError(
                "sequence parallel does not shard the causal model's KV caches (model/causal.py); "
                "run the streaming model in one process"
            )
        seq = x.shape[1]
        if seq < self.ranks:
            raise ValueError(f"sequence parallel: {seq} tokens cannot be split over {self.ranks} ranks")
        self._bounds = shard_bounds(seq, self.ranks)
        start, end = self._bounds[self.rank]
        local = x[:, start:end].contiguous()
        local_temb = [(max(a, start) - start, min(b, end) - start, mod) for a, b, mod in temb if b > start and a < end]
        local_rope = rope[start:end]
        n_vid = audio[1].shape[1] * frame_tokens if audio is not None else 0
        for i, block in enumerate(model.blocks):
            local = block(local, ctx, local_temb, local_rope)
            if audio is not None and i in model._injector_of_block:
                local = self._inject_audio(model._injector_of_block[i], local, start, n_vid, frame_tokens, audio)
        return self._gather(local, seq)

    def _inject_audio(
        self, idx: int, local: Tensor, start: int, n_vid: int, frame_tokens: int, audio: tuple[Tensor | None, Tensor]
    ) -> Tensor:
        """The audio injection of this shard's video tokens (global [lo, hi)): the latent frames
        they belong to, completed with zeros at a cut frame's ends, go through the model's own
        injection; the shard's tokens take their results."""
        lo, hi = start, min(start + local.shape[1], n_vid)
        if hi <= lo:
            return local
        first, last = lo // frame_tokens, -(-hi // frame_tokens)
        frames = local.new_zeros(local.shape[0], (last - first) * frame_tokens, local.shape[2])
        offset = lo - first * frame_tokens
        frames[:, offset : offset + hi - lo] = local[:, : hi - lo]
        glob, tokens = audio
        glob = glob[:, first:last] if glob is not None else None
        self.model._inject_audio(idx, frames, frame_tokens, glob, tokens[:, first:last])
        local[:, : hi - lo] = frames[:, offset : offset + hi - lo]
        return local

    def _gather(self, local: Tensor, seq: int) -> Tensor:
        """All ranks' shards -> the full [B, S, D] (shards padded to the longest for all_gather)."""
        longest = max(end - start for start, end in self._bounds)
        padded = local.new_zeros(local.shape[0], longest, local.shape[2])
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:, : end - start] for part, (start, end) in zip(parts, self._bounds, strict=True)], 1)


def sequence_parallel(model: WanS2VTransformer, group: dist.ProcessGroup | None = None) -> SequenceParallel:
    """Run `model`'s blocks sequence parallel over `group` (default: the world); returns the hooks
    (`.remove()` undoes them). Call on every rank of the group, each with the same model."""
    return SequenceParallel(model, group)


# ---------------------------------------------------------------------------------------------
# CFG parallel


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups: `sequence` shards its forwards (sequence_parallel); `cfg` pairs
    it with the rank running the other guidance branch (None: both branches run here)."""

    sequence: dist.ProcessGroup
    cfg: dist.ProcessGroup | None = None


def parallel_groups(cfg: bool = False) -> ParallelGroups:
    """The world split for one clip: without `cfg` one sequence-parallel group of all ranks; with
    it two halves (conditional, unconditional), each sequence parallel, rank r paired with
    r + W/2. Call on every rank (torch.distributed creates groups collectively, in one order)."""
    if not dist.is_initialized():
        raise RuntimeError("parallel groups need torch.distributed initialised (dist.init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not cfg:
        return ParallelGroups(dist.group.WORLD)
    if world % 2:
        raise ValueError(f"CFG parallel runs the two guidance branches on two equal halves: {world} ranks do not split")
    half = world // 2
    halves = [dist.new_group(list(range(start, start + half))) for start in (0, half)]
    pairs = [dist.new_group([r, r + half]) for r in range(half)]
    return ParallelGroups(halves[rank // half], pairs[rank % half])


class CfgParallel:
    """One guidance branch on this rank (0 conditional, 1 unconditional: its rank in the pair)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        if dist.get_world_size(group) != 2:
            raise ValueError(f"CFG parallel pairs 2 ranks, this group has {dist.get_world_size(group)}")
        self.group = group
        self.branch = dist.get_rank(group)

    def combine(self, mine: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's branch output -> (conditional, unconditional), the same on both ranks."""
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine.contiguous(), group=self.group)
        return both[0], both[1]


def parallelize(pipe, groups: ParallelGroups) -> SequenceParallel | None:
    """Make `pipe` (an S2VPipeline) run its guidance branch of `groups` and its forwards sequence
    parallel over `groups.sequence` (not hooked when that group has one rank); returns the
    sequence-parallel hooks, if any."""
    pipe.cfg_parallel = CfgParallel(groups.cfg) if groups.cfg is not None else None
    if dist.get_world_size(groups.sequence) == 1:
        return None
    return sequence_parallel(pipe.transformer, groups.sequence)
