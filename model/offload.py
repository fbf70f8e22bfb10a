"""Block streaming: the DiT's blocks live in pinned CPU memory and each is copied to the GPU just
before it runs, so a 14B model runs on a GPU that holds only two of its 40 blocks at a time.

    streamer = stream_blocks(model, torch.device("cuda"))   # the rest of the model goes to the GPU
    model(...)                                              # as usual; blocks arrive one by one
    streamer.remove()                                       # hooks off, blocks left in host memory

The model's forward knows nothing of this: the streamer is a pair of hooks on each block (torch's
forward pre-hook and forward hook, as diffusers' group offloading hooks its groups). Every block's
parameters and buffers are packed into one pinned byte buffer (its "home"), and the tensors
become views of it. The GPU holds a fixed number of slots (two by default), each the size of the
largest block. Before block i runs, its home is copied into a slot on a side stream and its
tensors are re-pointed at the slot; while block i computes, block i + 1 is copied into the other
slot. CUDA events order the two streams: the compute stream waits until a block has arrived, and
a copy into a slot waits until the block that used it has finished. The host never waits, so the
GPU's queue stays full. On an H100 (pinned copies at ~50 GB/s) a 14B block (0.7 GB) arrives in
less time than it computes at 480p: a streamed forward took 3.18 s against 3.18 s resident, at a
9.6 GiB peak where the resident DiT alone holds 30 GiB (docs/benchmarks.md).

Written here rather than taken from diffusers' block-level group offloading, which keeps the
model's other weights (12 audio injectors, 2.5 GB in bf16) on the offload device and moves them
at every forward, and gives each block a fresh GPU allocation; this keeps them resident and
reuses two fixed slots. Applied to this model in bench/pipeline_memory.py, diffusers' version
failed on its first forward with a device mismatch (not investigated further).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

__all__ = ["BlockStreamer", "block_streamer", "stream_blocks"]

_ALIGN = 256  # byte alignment of each tensor inside a packed block (fp8, bf16 and fp32 views)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class BlockStreamer:
    """Streams the modules of `blocks` to `device` in order; see the module docstring.

    It hooks `before(i)` and `after(i)` around block i; `after` runs also when the block raises
    (always_call), so a failed forward leaves every block home and the streamer usable.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device, slots: int = 2) -> None:
        if slots < 2:
            raise ValueError("block streaming needs at least 2 slots (one computes while one loads)")
        self.blocks = blocks
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # (tensor, byte offset, nbytes) per block; all blocks packed one after the other in one
        # host buffer, each block's slice of it being its "home"
        self.layout: list[list[tuple[torch.Tensor, int, int]]] = []
        sizes = []
        for block in blocks:
            entries, size = [], 0
            for tensor in [*block.parameters(), *block.buffers()]:
                nbytes = tensor.numel() * tensor.element_size()
                entries.append((tensor, size, nbytes))
                size = _aligned(size + nbytes)
            self.layout.append(entries)
            sizes.append(size)
        self.store = _pinned_bytes(sum(sizes)) if self.cuda else torch.empty(sum(sizes), dtype=torch.uint8)
        self.homes: list[torch.Tensor] = []
        start = 0
        for entries, size in zip(self.layout, sizes, strict=True):
            home = self.store[start : start + size]
            start += size
            for tensor, offset, nbytes in entries:
                view = self._view(home, tensor, offset, nbytes)
                view.copy_(tensor.data)
                tensor.data = view  # the copy it came from is freed here
            self.homes.append(home)
        largest = max((home.numel() for home in self.homes), default=0)
        self.slots = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.loaded = [torch.cuda.Event() for _ in range(slots)] if self.cuda else []
        self.freed = [torch.cuda.Event() for _ in range(slots)] if self.cuda else []
        self._owner: list[int | None] = [None] * slots
        self._slot_of: dict[int, int] = {}
        self._next = 0
        self.bytes_copied = 0
        # the hooks run outside torch.compile's graphs: they re-point tensors, which a graph cannot
        # hold, and a graph holding them would recompile for every block
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for i, block in enumerate(blocks):
            pre = torch.compiler.disable(lambda module, args, i=i: self.before(i))
            post = torch.compiler.disable(lambda module, args, output, i=i: self.after(i))
            self._hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post, always_call=True)]
        blocks._block_streamer = self  # as diffusers keeps its hook registry on the module

    @property
    def slot_bytes(self) -> int:
        """GPU memory the slots take, in bytes."""
        return sum(slot.numel() for slot in self.slots)

    @property
    def host_bytes(self) -> int:
        """Host memory holding the blocks (page-locked on CUDA), in bytes."""
        return self.store.numel()

    @staticmethod
    def _view(buffer: torch.Tensor, like: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
        return buffer[offset : offset + nbytes].view(like.dtype).view(like.shape)

    def _bind(self, i: int, buffer: torch.Tensor) -> None:
        """Point block i's tensors at `buffer` (its home or a slot)."""
        for tensor, offset, nbytes in self.layout[i]:
            tensor.data = self._view(buffer, tensor, offset, nbytes)

    def _load(self, i: int) -> None:
        """Start copying block i into the next slot (the one the block before last used)."""
        s = self._next
        self._next = (s + 1) % len(self.slots)
        previous = self._owner[s]
        if previous is not None:
            self._slot_of.pop(previous, None)
        home = self.homes[i]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.freed[s])  # its last user has finished
                self.slots[s][: home.numel()].copy_(home, non_blocking=True)
                self.loaded[s].record(self.copy_stream)
        else:
            self.slots[s][: home.numel()].copy_(home)
        self.bytes_copied += home.numel()
        self._owner[s] = i
        self._slot_of[i] = s

    def before(self, i: int) -> None:
        """Make block i runnable on the device, and start loading the block after it."""
        if i not in self._slot_of:
            self._load(i)
        s = self._slot_of[i]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[s])
        self._bind(i, self.slots[s])
        following = (i + 1) % len(self.blocks)  # after the last block: the first, for the next forward
        if following not in self._slot_of and len(self.blocks) > 1:
            self._load(following)

    def after(self, i: int) -> None:
        """Block i's kernels are queued: its slot may be refilled once they finish."""
        s = self._slot_of.get(i)
        if self.cuda and s is not None:
            self.freed[s].record(torch.cuda.current_stream(self.device))
        self._bind(i, self.homes[i])

    def remove(self) -> None:
        """Unhook the streamer; the blocks stay in their host homes."""
        self.reset()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        del self.blocks._block_streamer

    def reset(self) -> None:
        """Wait for every copy, forget every slot and point all blocks home."""
        if self.cuda:
            self.copy_stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        for i in range(len(self.blocks)):
            self._bind(i, self.homes[i])
        self._owner = [None] * len(self.slots)
        self._slot_of.clear()
        self._next = 0


def _pinned_bytes(nbytes: int) -> torch.Tensor:
    """A page-locked host buffer of exactly `nbytes` (so copies from it run asynchronously).

    Pinned by registering ordinary memory with CUDA: torch's pinned allocator rounds each request
    up to a power of two, which for 28 GB of blocks would lock 32 GB (or 40 GB block by block)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    try:
        cudart = torch.cuda.cudart()
        registered = nbytes > 0 and int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)) == 0
    except (AttributeError, RuntimeError, TypeError):
        registered = False
    if not (registered and buffer.is_pinned()):
        return buffer.pin_memory()
    # unlock the pages when the buffer goes (weakref callbacks run before torch frees the memory)
    unlock = weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
    unlock.atexit = False  # at exit the process's memory goes anyway, maybe after CUDA's teardown
    return buffer


def block_streamer(model: nn.Module) -> BlockStreamer | None:
    """The BlockStreamer hooked around `model.blocks`, if any."""
    return getattr(model.blocks, "_block_streamer", None)


def stream_blocks(model: nn.Module, device: torch.device | str, slots: int = 2) -> BlockStreamer:
    """Put everything of `model` but `model.blocks` on `device`, keep the blocks in pinned CPU
    memory and hook a BlockStreamer around them; returns it (`block_streamer(model)` finds it)."""
    device = torch.device(device)
    if block_streamer(model) is not None:
        raise ValueError("this model already streams its blocks")
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for tensor in [*model.parameters(recurse=False), *model.buffers(recurse=False)]:
        tensor.data = tensor.data.to(device)
    model.blocks.to("cpu")
    return BlockStreamer(model.blocks, device, slots)
