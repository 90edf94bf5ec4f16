"""Streaming state of the fast models: device tensors allocated once per batch size, no allocation per frame.

Mimi (`MimiCache`): per slot and direction a frame counter; per streaming conv its input history
[2, B, C_in, K - S] and per transposed conv its overlap [2, B, C_out, K - S], both double-buffered
by the parity of the frame counter (kernels read one buffer and write the other); per transformer
layer a ring of keys and values [B, H, context, D]; one split-K workspace shared by every kernel of
both directions (they run one after another on one stream), sized for the largest need. Reset of a
slot zeroes its histories and overlaps and its counters; the rings need no clearing, since a counter
of 0 makes every old entry invisible.

The LM (`PagedKVCache`): Helium's keys and values in one pool of fixed-size pages shared by all
slots, a per-slot ring of pages reserved at admission (a full pool refuses a new conversation with
`KVPoolExhausted`, never evicts another), per-slot positions and the step's execution mask in device
memory; attention reads only each slot's live window (kernels/paged_attention.py).

The LM step's whole state (`LMCache`): the paged KV cache, LMGen's per-slot frame counter and token
delay line, the depth transformer's per-frame keys and values, and one shared split-K workspace.

Batch buckets: every cache is allocated for all slots; `narrow(b)` gives the first b slots as views (what
a bucket's captured step runs on, so its replay touches only those rows) and `swap(a, b)` exchanges two
slots' whole state (the engine keeps the open conversations in the first rows). Workspaces are sized
for every bucket the cache is built for.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from . import ops
from .reference.lm import UNGENERATED
from .reference.state import swap_rows
from .reference.mimi import CausalConv1d, CausalConvTranspose1d


class MimiCache:
    def __init__(self, model, batch_size: int, device: torch.device, buckets: Sequence[int] = ()):
        """model: a FastMimi (its `streaming_input_lengths()` plan the split workspace). buckets: the
        batch sizes `narrow` will be asked for (the workspace is sized for every one of them)."""
        config = model.config
        self.batch_size = batch_size
        self.encoder_frame = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.decoder_frame = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.history: dict[str, torch.Tensor] = {}
        self.overlap: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            # k = 1 convs get an empty history: one kernel and one lookup for every conv.
            if isinstance(module, CausalConv1d):
                self.history[name] = torch.zeros(2, batch_size, module.weight.shape[1], module.history, device=device)
            elif isinstance(module, CausalConvTranspose1d):
                self.overlap[name] = torch.zeros(2, batch_size, module.out_channels, module.overlap, device=device)
        needs = [need for b in {batch_size, *buckets} for need in self._workspace_needs(model, b)]
        self.workspace = ops.SplitWorkspace(max(n[0] for n in needs), max(n[1] for n in needs), device)
        ring = (batch_size, config.num_heads, config.context, config.head_dim)
        self.rings = {f"{side}.{i}": (torch.zeros(ring, device=device), torch.zeros(ring, device=device))
                      for side in ("encoder_transformer", "decoder_transformer") for i in range(config.num_layers)}

    @staticmethod
    def _workspace_needs(model, batch_size: int) -> list[tuple[int, int]]:
        """(partial floats, counters) of every split kernel of both directions at batch_size."""
        config = model.config
        lengths = model.streaming_input_lengths()
        steps = lengths["encoder.conv_out"]
        rows = batch_size * steps
        needs = [ops.ring_attention_workspace_size(batch_size, config.num_heads, steps, config.head_dim,
                                                   config.context)]
        needs += [ops.linear_workspace_size(rows, n, k, torch.float32) for n, k in (
            (3 * config.dimension, config.dimension), (config.dimension, config.dimension),
            (config.dim_feedforward, config.dimension), (config.dimension, config.dim_feedforward))]
        for name, module in model.named_modules():
            if isinstance(module, CausalConv1d):
                c_out, c_in, kernel = module.weight.shape
                needs.append(ops.conv1d_stream_workspace_size(batch_size, c_in, c_out, kernel, module.stride,
                                                              lengths[name]))
            elif isinstance(module, CausalConvTranspose1d):
                needs.append(ops.conv_transpose1d_stream_workspace_size(
                    batch_size, module.weight.shape[0], module.out_channels, module.weight.shape[-1], module.stride,
                    lengths[name], module.groups))
        return needs

    def narrow(self, batch_size: int) -> "MimiCache":
        """The state of the first batch_size slots as views of this cache's tensors (a step on it updates
        those slots here), sharing the workspace."""
        narrowed = copy.copy(self)
        narrowed.batch_size = batch_size
        narrowed.encoder_frame = self.encoder_frame[:batch_size]
        narrowed.decoder_frame = self.decoder_frame[:batch_size]
        narrowed.history = {name: t[:, :batch_size] for name, t in self.history.items()}
        narrowed.overlap = {name: t[:, :batch_size] for name, t in self.overlap.items()}
        narrowed.rings = {name: (k[:batch_size], v[:batch_size]) for name, (k, v) in self.rings.items()}
        return narrowed

    def reset(self, slots: torch.Tensor) -> None:
        """Restarts the selected slots (bool mask [B]) in both directions."""
        self.encoder_frame[slots] = 0
        self.decoder_frame[slots] = 0
        for tensor in (*self.history.values(), *self.overlap.values()):
            tensor[:, slots] = 0

    def swap(self, a: int, b: int) -> None:
        """Exchanges the whole state of slots a and b."""
        for tensor in (self.encoder_frame, self.decoder_frame, *(t for ring in self.rings.values() for t in ring)):
            swap_rows(tensor, a, b)
        for tensor in (*self.history.values(), *self.overlap.values()):
            swap_rows(tensor, a, b, dim=1)


class KVPoolExhausted(RuntimeError):
    """`PagedKVCache.admit` found fewer free pages than one more conversation needs."""


class PagedKVCache:
    """Helium's KV cache: one pool of fixed-size pages shared by every slot, per-slot rings of pages.

    Layout (all allocated once, on `device`):
        k_pool, v_pool   [layers, num_pages, H, page_size, D]   keys after RoPE, and values; a page id
                                                                 names the same page in every layer
        page_table       [max_slots, pages_per_slot] int32      slot b's ring of pages
        positions        [max_slots] int32                      the next token's absolute position
        admitted         [max_slots] bool                       slots that hold pages
        exec_mask        [max_slots] bool                       this step's running slots (set_exec_mask)

    Position p of slot b lives in page page_table[b, (p // page_size) % pages_per_slot], row
    p % page_size. A key at p is visible from the query at q iff 0 <= q - p < context (Kyutai's window),
    so the live window is min(position + 1, context) keys after a step's write; positions are the only
    per-slot counter, so no separate length can disagree with them. A slot's ring has
    pages_per_slot = ceil(context / page_size) + 1 pages: the window spans at most that many pages, and the
    page the newest position enters holds no key any query can still see, so pages are reused whole, in
    ring order, and never hold two live generations. Pages are never cleared: a conversation reads only
    positions it wrote itself (positions restart at 0 on admit and reset), so a recycled page's old
    contents are never read.

    Memory: bytes per slot = layers x 2 (K, V) x pages_per_slot x page_size x H x D x itemsize, plus
    pages_per_slot x 4 for its page table. Helium (32 layers, 32 x 128, context 3000) in bf16 with pages of
    16: 189 pages = 3024 positions x 512 KiB = 1.585 GB a slot (Kyutai's ring of 3000: 1.573 GB), so 64
    slots take 101.5 GB: they fit an H200 (141 GB) beside the 15.4 GB of weights; an H100 (80 GB) holds
    about 40.

    Step protocol (graph-safe: only device tensors are read or written, nothing is allocated):
    `set_exec_mask(mask)` once per step (the running slots, intersected with the admitted ones), then for
    every layer the attention kernel with `layer(i)`, `page_table`, `positions` and `exec_mask` (all layers
    see the same positions), then `advance()` once after the last layer. Slots enter and leave outside
    the step, on the host: `admit` reserves a slot's pages from the free list or raises KVPoolExhausted,
    leaving everything as it was; `release` returns them; `reset` restarts a slot at position 0.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, context: int, max_slots: int,
                 page_size: int = 16, num_pages: int | None = None, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu"):
        """num_pages: the pool's size; by default enough for every slot at once. A smaller pool serves
        num_pages // pages_per_slot conversations at a time."""
        self.context = context
        self.page_size = page_size
        self.max_slots = max_slots
        self.pages_per_slot = -(-context // page_size) + 1
        self.num_pages = max_slots * self.pages_per_slot if num_pages is None else num_pages
        if self.num_pages < self.pages_per_slot:
            raise ValueError(f"a pool of {self.num_pages} pages cannot hold one conversation "
                             f"({self.pages_per_slot} pages of {page_size})")
        pool = (num_layers, self.num_pages, num_heads, page_size, head_dim)
        self.k_pool = torch.empty(pool, dtype=dtype, device=device)
        self.v_pool = torch.empty(pool, dtype=dtype, device=device)
        self.page_table = torch.zeros(max_slots, self.pages_per_slot, dtype=torch.int32, device=device)
        self.positions = torch.zeros(max_slots, dtype=torch.int32, device=device)
        self.admitted = torch.zeros(max_slots, dtype=torch.bool, device=device)
        self.exec_mask = torch.zeros(max_slots, dtype=torch.bool, device=device)
        # A stack: a released conversation's pages are the next handed out (still warm in L2).
        self._free_pages = list(range(self.num_pages - 1, -1, -1))
        self._slot_pages: dict[int, list[int]] = {}

    @classmethod
    def for_lm(cls, config, max_slots: int, **kwargs) -> PagedKVCache:
        """The cache of an LMConfig's Helium (layers, heads, head_dim, context)."""
        return cls(config.num_layers, config.num_heads, config.head_dim, config.context, max_slots, **kwargs)

    @staticmethod
    def bytes_per_slot(num_layers: int, num_heads: int, head_dim: int, context: int, page_size: int = 16,
                       dtype: torch.dtype = torch.bfloat16) -> int:
        """Pool bytes one conversation reserves (its page table's 4 bytes a page aside)."""
        pages_per_slot = -(-context // page_size) + 1
        return num_layers * 2 * pages_per_slot * page_size * num_heads * head_dim * dtype.itemsize

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s (k_pool, v_pool), each [num_pages, H, page_size, D]."""
        return self.k_pool[index], self.v_pool[index]

    def admit(self, slot: int) -> None:
        """Gives `slot` a ring of pages and starts its conversation at position 0. Raises
        KVPoolExhausted, changing nothing, when the free list cannot supply the ring."""
        self._check_slot(slot)
        if slot in self._slot_pages:
            raise ValueError(f"slot {slot} is already admitted")
        if len(self._free_pages) < self.pages_per_slot:
            raise KVPoolExhausted(
                f"KV pool exhausted: slot {slot} needs {self.pages_per_slot} pages, "
                f"{len(self._free_pages)} of {self.num_pages} are free ({len(self._slot_pages)} conversations hold the rest); "
                f"release a slot or build the cache with more pages")
        pages = [self._free_pages.pop() for _ in range(self.pages_per_slot)]
        self._slot_pages[slot] = pages
        self.page_table[slot] = torch.tensor(pages, dtype=torch.int32)
        self.positions[slot] = 0
        self.admitted[slot] = True

    def release(self, slot: int) -> None:
        """Returns `slot`'s pages to the free list; the slot no longer runs until admitted again."""
        self._check_slot(slot)
        if slot not in self._slot_pages:
            raise ValueError(f"slot {slot} is not admitted")
        self.admitted[slot] = False
        # exec_mask stays within the admitted slots between steps too.
        self.exec_mask[slot] = False
        self._free_pages.extend(reversed(self._slot_pages.pop(slot)))

    def reset(self, slot: int) -> None:
        """Restarts `slot`'s conversation at position 0, keeping its pages."""
        self._check_slot(slot)
        if slot not in self._slot_pages:
            raise ValueError(f"slot {slot} is not admitted")
        self.positions[slot] = 0

    def set_exec_mask(self, exec_mask: torch.Tensor) -> None:
        """This step's running slots: exec_mask [max_slots] bool, restricted to the admitted slots (a slot
        without pages must never reach the kernel, whose page table row may name another slot's pages)."""
        torch.logical_and(exec_mask, self.admitted, out=self.exec_mask)

    def advance(self) -> None:
        """After the step's last layer: the running slots move to their next position."""
        torch.add(self.positions, self.exec_mask, out=self.positions)

    def narrow(self, slots: int) -> "PagedKVCache":
        """The first `slots` slots as a cache over the same pool whose per-slot tensors are views of this
        one's: what a step of a smaller batch runs on. Admit, release and swap on the full cache."""
        narrowed = copy.copy(self)
        narrowed.max_slots = slots
        for name in ("page_table", "positions", "admitted", "exec_mask"):
            setattr(narrowed, name, getattr(self, name)[:slots])
        return narrowed

    def swap(self, a: int, b: int) -> None:
        """Exchanges slots a and b: their pages (with the keys and values in them) and positions."""
        self._check_slot(a)
        self._check_slot(b)
        for name in ("page_table", "positions", "admitted", "exec_mask"):
            swap_rows(getattr(self, name), a, b)
        pages_a, pages_b = self._slot_pages.pop(a, None), self._slot_pages.pop(b, None)
        if pages_a is not None:
            self._slot_pages[b] = pages_a
        if pages_b is not None:
            self._slot_pages[a] = pages_b

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.max_slots - 1}")


class LMCache:
    """Everything the fast LM step reads and writes besides the weights, allocated once for `batch_size`
    slots (all admitted at construction; the engine's slot API admits and releases them later):

        kv            PagedKVCache of Helium (its positions are each slot's frame index)
        frame         [B] int64       the slot's frame index (LMGen's offset): the sampling counter
        tokens        [B, 1 + n_q, max_delay + 2] int64   the delay line of every stream (LMGen's cache)
        depth_k/_v    [depformer layers, B, heads, dep_q, head_dim]  the depth transformer's keys and
                      values of this frame's codebook steps (rewritten every frame)
        depth_scratch the fused depth step's activations between its phases and its counters
                      (ops.depth_step, with FastLM.prepare(fused_depth=True))
        workspace     one SplitWorkspace for every split linear and attention of the step, sized for
                      the largest (they run one after another on one stream)
    """

    def __init__(self, config, batch_size: int, device: torch.device, dtype: torch.dtype,
                 kv_pages: int | None = None, buckets: Sequence[int] = (), kv_dtype: torch.dtype | None = None):
        """buckets: the batch sizes `narrow` will be asked for (the workspace is sized for all of them).
        kv_dtype: Helium's KV cache dtype, default `dtype` (the activations'); torch.float8_e4m3fn halves its
        bytes (reference.attention.to_cache_dtype)."""
        self.config = config
        self.batch_size = batch_size
        self.kv = PagedKVCache.for_lm(config, batch_size, num_pages=kv_pages, dtype=kv_dtype or dtype,
                                      device=device)
        self.frame = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.tokens = torch.full((batch_size, config.num_streams, config.max_delay + 2), UNGENERATED,
                                 dtype=torch.long, device=device)
        self._allocate_depth_scratch(batch_size, dtype, device)
        needs = [need for b in {batch_size, *buckets}
                 for need in self._workspace_needs(config, b, dtype, self.kv.k_pool.dtype)]
        self.workspace = ops.SplitWorkspace(max(n[0] for n in needs), max(n[1] for n in needs), device)
        for slot in range(batch_size):
            self.kv.admit(slot)

    def _allocate_depth_scratch(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        c = self.config
        depth = (c.depformer_num_layers, batch_size, c.depformer_num_heads, c.dep_q, c.depformer_head_dim)
        self.depth_k = torch.zeros(depth, dtype=dtype, device=device)
        self.depth_v = torch.zeros(depth, dtype=dtype, device=device)
        self.depth_scratch = ops.depth_step_scratch(batch_size, c.depformer_dim, c.depformer_hidden,
                                                    c.depformer_num_heads, dtype, device)

    @staticmethod
    def _workspace_needs(c, b: int, dtype: torch.dtype, kv_dtype: torch.dtype) -> list[tuple[int, int]]:
        """(partial floats, counters) of every split linear and attention of the step at batch b (activations
        of dtype, Helium's KV cache of kv_dtype, whose attention plan may differ)."""
        linears = [  # (output width, input width, gated)
            (3 * c.dim, c.dim, False), (c.dim, c.dim, False), (c.hidden, c.dim, True), (c.dim, c.hidden, False),
            (c.text_card, c.dim, False), (c.dep_q * c.depformer_dim, c.dim, False),
            (3 * c.depformer_dim, c.depformer_dim, False), (c.depformer_dim, c.depformer_dim, False),
            (c.depformer_hidden, c.depformer_dim, True), (c.depformer_dim, c.depformer_hidden, False),
            (c.card, c.depformer_dim, False)]
        needs = [ops.linear_workspace_size(b, n, k, dtype, gated=gated) for n, k, gated in linears]
        needs.append(ops.paged_attention_workspace_size(b, c.num_heads, c.head_dim, c.context, kv_dtype=kv_dtype))
        return needs

    def narrow(self, batch_size: int) -> "LMCache":
        """The first batch_size slots: their per-slot state as views of this cache's tensors (a step on it
        updates those slots here), the shared workspace, and depth-transformer scratch of its own (it holds
        nothing between frames, and the fused depth step needs it contiguous)."""
        narrowed = copy.copy(self)
        narrowed.batch_size = batch_size
        narrowed.kv = self.kv.narrow(batch_size)
        narrowed.frame = self.frame[:batch_size]
        narrowed.tokens = self.tokens[:batch_size]
        if batch_size != self.batch_size:
            narrowed._allocate_depth_scratch(batch_size, self.depth_k.dtype, self.depth_k.device)
        return narrowed

    def reset(self, slots: torch.Tensor) -> None:
        """Restarts the selected slots (bool mask [B]): frame 0, an empty delay line, KV position 0."""
        self.frame[slots] = 0
        self.tokens[slots] = UNGENERATED
        self.kv.positions[slots] = 0

    def swap(self, a: int, b: int) -> None:
        """Exchanges the whole state of slots a and b."""
        swap_rows(self.frame, a, b)
        swap_rows(self.tokens, a, b)
        self.kv.swap(a, b)
