"""PagedKVCache + paged_attention against dense masked SDPA over each conversation's whole history.

Tiny shapes (2 heads x 16, a window of 10 in pages of 4: rings of 4 pages) so that runs of 24 steps
cross the window twice. Pools start as NaN: a row read before this conversation wrote it poisons the output.
"""
import pytest
import torch
import triton
import triton.language as tl

from moshi_fast import cuda_ext, ops
from moshi_fast.cache import KVPoolExhausted, PagedKVCache
from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.paged_attention import (_resolve_tiles, _to_cache, paged_attention,
                                                paged_attention_candidate_tiles, paged_attention_ref,
                                                paged_attention_workspace_size)
from moshi_fast.reference.attention import attend, rope_interleaved, split_heads, to_cache_dtype

from .helpers import graph_after_warmup, rel_err

HEADS, HEAD_DIM, CONTEXT, PAGE_SIZE, MAX_PERIOD = 2, 16, 10, 4, 10000.0
WIDTH = HEADS * HEAD_DIM
SPLIT = {"splits": 2, "block_n": 4}
"""A plan that splits even these short windows, with several blocks per split."""


def new_cache(slots: int, layers: int = 1, num_pages: int | None = None) -> PagedKVCache:
    cache = PagedKVCache(layers, HEADS, HEAD_DIM, CONTEXT, slots, page_size=PAGE_SIZE, num_pages=num_pages,
                         dtype=torch.float32)
    cache.k_pool.fill_(float("nan"))
    cache.v_pool.fill_(float("nan"))
    return cache


def run_step(cache: PagedKVCache, qkv: torch.Tensor, exec_mask: torch.Tensor, tiles=None, reference=False):
    """One step of every layer (qkv [layers, B, 3 * WIDTH]) and the position advance; outputs
    [layers, B, WIDTH] start as NaN, so rows the kernel must not write stay NaN."""
    cache.set_exec_mask(exec_mask)
    outs = torch.full((qkv.shape[0], qkv.shape[1], WIDTH), float("nan"))
    for layer in range(qkv.shape[0]):
        args = (qkv[layer], *cache.layer(layer), cache.page_table, cache.positions, cache.exec_mask, CONTEXT,
                MAX_PERIOD)
        if reference:
            paged_attention_ref(*args, out=outs[layer])
        else:
            paged_attention(*args, out=outs[layer], tiles=tiles)
    cache.advance()
    return outs


class DenseHistory:
    """Every conversation as plain tensors: all its rotated keys and values from position 0 on, per layer."""

    def __init__(self, layers: int, slots: int):
        self.keys = [[[] for _ in range(slots)] for _ in range(layers)]
        self.values = [[[] for _ in range(slots)] for _ in range(layers)]

    def restart(self, slot: int) -> None:
        for layer in range(len(self.keys)):
            self.keys[layer][slot].clear()
            self.values[layer][slot].clear()

    def step(self, layer: int, slot: int, qkv_row: torch.Tensor) -> torch.Tensor:
        """Appends the new token and returns its attention output [WIDTH] (the reference model's rope and
        window-masked SDPA over the whole history)."""
        keys, values = self.keys[layer][slot], self.values[layer][slot]
        position = torch.tensor([[len(keys)]])
        q, k, v = split_heads(qkv_row.view(1, 1, -1), HEADS)
        q, k = rope_interleaved(q, position, MAX_PERIOD), rope_interleaved(k, position, MAX_PERIOD)
        keys.append(k)
        values.append(v)
        key_pos = torch.arange(len(keys))[None]
        attended = attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), position, key_pos, CONTEXT)
        return attended.reshape(-1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN included (the pools' never-written rows are NaN)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def slot_pages(cache: PagedKVCache, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    pages = cache.page_table[slot].long()
    return cache.k_pool[:, pages].clone(), cache.v_pool[:, pages].clone()


@pytest.mark.parametrize("tiles", [None, SPLIT], ids=["unsplit", "2-splits"])
def test_conversations_match_dense_history(tiles):
    """4 slots, 2 layers, 24 steps. Slot 0 runs throughout (positions past 2 x context); slot 1 sits out
    steps 4-7 (NaN qkv; its pages, position and output rows stay untouched) and is reset at step 15;
    slot 2 is admitted at step 9; slot 3 is never admitted, though the step's mask asks it to run.
    Kernel, reference (on a twin cache) and dense history agree at every step."""
    layers, slots, steps = 2, 4, 24
    cache, twin = new_cache(slots, layers), new_cache(slots, layers)
    history = DenseHistory(layers, slots)
    for c in (cache, twin):
        c.admit(0)
        c.admit(1)
    idle = range(4, 8)
    for step in range(steps):
        if step == 9:
            cache.admit(2)
            twin.admit(2)
        if step == 15:
            cache.reset(1)
            twin.reset(1)
            history.restart(1)
        running = [0, 2] if step in idle else [0, 1, 2]
        running = [slot for slot in running if slot != 2 or step >= 9]
        exec_mask = torch.zeros(slots, dtype=torch.bool)
        exec_mask[running + [3]] = True
        qkv = torch.full((layers, slots, 3 * WIDTH), float("nan"))
        qkv[:, running] = torch.randn(layers, len(running), 3 * WIDTH)
        if step == idle[0]:
            idle_pages = slot_pages(cache, 1)
        got = run_step(cache, qkv, exec_mask, tiles)
        expected = run_step(twin, qkv, exec_mask, reference=True)
        for layer in range(layers):
            for slot in running:
                dense = history.step(layer, slot, qkv[layer, slot])
                assert rel_err(got[layer, slot], dense) < 1e-5, (step, layer, slot)
                assert rel_err(expected[layer, slot], dense) < 1e-5, (step, layer, slot)
        silent = [slot for slot in range(slots) if slot not in running]
        assert got[:, silent].isnan().all() and expected[:, silent].isnan().all(), step
        if step == idle[-1]:
            assert all(same_bits(a, b) for a, b in zip(slot_pages(cache, 1), idle_pages))
    assert cache.positions.tolist() == [steps, steps - 15, steps - 9, 0]
    assert torch.equal(cache.positions, twin.positions)


def test_admission_mid_run_leaves_other_slots_bitwise_unchanged():
    """Slot 0's outputs and pages are the same bits whether or not slot 1 joins at step 4."""
    slots, steps = 2, 14
    qkv = torch.randn(steps, 1, slots, 3 * WIDTH)
    results = []
    for admit_second in (False, True):
        cache = new_cache(slots)
        cache.admit(0)
        outs = []
        for step in range(steps):
            if admit_second and step == 4:
                cache.admit(1)
            exec_mask = torch.tensor([True, admit_second and step >= 4])
            outs.append(run_step(cache, qkv[step], exec_mask, SPLIT)[0, 0])
        results.append((torch.stack(outs), *slot_pages(cache, 0), cache.positions[0].clone()))
    for alone, beside in zip(*results):
        assert same_bits(alone, beside)


def fresh_conversation(qkv: torch.Tensor, tiles) -> torch.Tensor:
    """Outputs of one slot of a new cache over steps qkv [steps, 3 * WIDTH]."""
    cache = new_cache(1)
    cache.admit(0)
    run = torch.tensor([True])
    return torch.stack([run_step(cache, row.view(1, 1, -1), run, tiles)[0, 0] for row in qkv])


def test_reset_restarts_a_slot_like_a_fresh_one():
    """Slot 0 is reset after 14 steps (past the window); its next 6 outputs are those of a fresh
    conversation, bit for bit, and slot 1 carries on undisturbed."""
    slots = 2
    cache = new_cache(slots)
    history = DenseHistory(1, slots)
    for slot in range(slots):
        cache.admit(slot)
    run = torch.ones(slots, dtype=torch.bool)
    after_reset = torch.randn(6, 3 * WIDTH)
    restarted = []
    for step in range(20):
        if step == 14:
            cache.reset(0)
        qkv = torch.randn(1, slots, 3 * WIDTH)
        if step >= 14:
            qkv[0, 0] = after_reset[step - 14]
        out = run_step(cache, qkv, run, SPLIT)
        assert rel_err(out[0, 1], history.step(0, 1, qkv[0, 1])) < 1e-5, step
        if step >= 14:
            restarted.append(out[0, 0])
    assert torch.equal(torch.stack(restarted), fresh_conversation(after_reset, SPLIT))


def test_release_and_readmit_reuses_pages_without_leak():
    """A pool of exactly two rings: after slot 0's release its pages are the only free ones; the next
    conversation in slot 0 gets them back and reads nothing of the old one (fresh-run bits), while slot 1
    keeps matching its dense history and a third conversation cannot enter."""
    slots = 3
    cache = new_cache(slots, num_pages=2 * new_cache(1).pages_per_slot)
    history = DenseHistory(1, slots)
    cache.admit(0)
    cache.admit(1)
    old_pages = set(cache.page_table[0].tolist())
    new_conversation = torch.randn(7, 3 * WIDTH)
    outs = []
    for step in range(20):
        if step == 13:
            cache.release(0)
            assert cache.free_pages == cache.pages_per_slot
            cache.admit(0)
            assert set(cache.page_table[0].tolist()) == old_pages
            with pytest.raises(KVPoolExhausted):
                cache.admit(2)
        exec_mask = torch.tensor([True, True, False])
        qkv = torch.randn(1, slots, 3 * WIDTH)
        if step >= 13:
            qkv[0, 0] = new_conversation[step - 13]
        out = run_step(cache, qkv, exec_mask, SPLIT)
        assert rel_err(out[0, 1], history.step(0, 1, qkv[0, 1])) < 1e-5, step
        if step >= 13:
            outs.append(out[0, 0])
    assert torch.equal(torch.stack(outs), fresh_conversation(new_conversation, SPLIT))


def test_swap_moves_conversations_between_slots_and_narrow_runs_the_first_slots():
    """Three conversations; slots 0 and 2 exchange places mid-run (their pages and positions move, no key
    is copied); then a cache narrowed to the first two slots steps them alone. Every conversation keeps
    matching its dense history, and the release after the swap frees the right ring."""
    slots = 3
    cache = new_cache(slots)
    history = DenseHistory(1, slots)
    for slot in range(slots):
        cache.admit(slot)
    conversation_at = [0, 1, 2]
    for step in range(16):
        if step == 6:
            pages_of_0, pages_of_2 = cache.page_table[0].clone(), cache.page_table[2].clone()
            cache.swap(0, 2)
            assert torch.equal(cache.page_table[0], pages_of_2) and torch.equal(cache.page_table[2], pages_of_0)
            conversation_at = [2, 1, 0]
        narrowed = step >= 11
        runner = cache.narrow(2) if narrowed else cache
        rows = 2 if narrowed else slots
        qkv = torch.randn(1, rows, 3 * WIDTH)
        out = run_step(runner, qkv, torch.ones(rows, dtype=torch.bool), SPLIT)
        for row in range(rows):
            expected = history.step(0, conversation_at[row], qkv[0, row])
            assert rel_err(out[0, row], expected) < 1e-5, (step, row)
    assert cache.positions.tolist() == [16, 16, 11]
    released = set(cache.page_table[2].tolist())
    cache.release(2)
    assert set(cache._free_pages) == released
    with pytest.raises(ValueError, match="outside"):
        cache.swap(0, 3)


def test_pool_exhaustion_at_admission_changes_nothing():
    slots = 3
    pages_per_slot = new_cache(1).pages_per_slot
    cache = new_cache(slots, num_pages=2 * pages_per_slot + 3)
    cache.admit(0)
    cache.admit(2)
    cache.positions[0] = 17
    before = (cache.page_table.clone(), cache.positions.clone(), cache.admitted.clone(), cache.free_pages)
    with pytest.raises(KVPoolExhausted, match="KV pool exhausted: slot 1 needs 4 pages, 3 of 11 are free"):
        cache.admit(1)
    after = (cache.page_table, cache.positions, cache.admitted, cache.free_pages)
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after[:3])) and before[3] == after[3]
    cache.release(2)
    cache.admit(1)
    assert cache.admitted.tolist() == [True, True, False] and cache.free_pages == 3
    assert not set(cache.page_table[0].tolist()) & set(cache.page_table[1].tolist())
    with pytest.raises(ValueError, match="already admitted"):
        cache.admit(1)
    with pytest.raises(ValueError, match="not admitted"):
        cache.release(2)
    with pytest.raises(ValueError, match="not admitted"):
        cache.reset(2)
    with pytest.raises(ValueError, match="outside"):
        cache.admit(3)
    with pytest.raises(ValueError, match="cannot hold one conversation"):
        new_cache(1, num_pages=pages_per_slot - 1)


def ragged_batch(positions: list[int]):
    """A full cache at the given positions with random pool contents, and a new token per slot."""
    cache = new_cache(len(positions))
    for slot in range(len(positions)):
        cache.admit(slot)
    cache.k_pool.normal_()
    cache.v_pool.normal_()
    cache.positions.copy_(torch.tensor(positions))
    cache.set_exec_mask(torch.ones(len(positions), dtype=torch.bool))
    return cache, torch.randn(len(positions), 3 * WIDTH)


def call(cache: PagedKVCache, qkv: torch.Tensor, reference=False, **kwargs) -> torch.Tensor:
    args = (qkv, *cache.layer(0), cache.page_table, cache.positions, cache.exec_mask, CONTEXT, MAX_PERIOD)
    out = torch.full((qkv.shape[0], WIDTH), float("nan"))
    return paged_attention_ref(*args, out=out) if reference else paged_attention(*args, out=out, **kwargs)


RAGGED = [0, 1, 3, 9, 10, 23, 57]
"""A first token, windows shorter than one block, exactly the context, and wrapped rings."""


def test_split_matches_unsplit_and_is_deterministic():
    cache, qkv = ragged_batch(RAGGED)
    expected = call(cache, qkv, reference=True)
    unsplit = call(cache, qkv, tiles={"splits": 1, "block_n": 4})
    assert rel_err(unsplit, expected) < 1e-5
    for tiles in ({"splits": 2, "block_n": 2}, {"splits": 3, "block_n": 4}, {"splits": 5, "block_n": 2}):
        sizes = paged_attention_workspace_size(len(RAGGED), HEADS, HEAD_DIM, CONTEXT, tiles)
        workspace = SplitWorkspace(*sizes, "cpu")
        first = call(cache, qkv, tiles=tiles, workspace=workspace)
        again = call(cache, qkv, tiles=tiles, workspace=workspace)
        assert rel_err(first, unsplit) < 1e-5, tiles
        assert torch.equal(first, again), tiles
        assert not workspace.counters.any(), "the combining program resets its counter"


@pytest.mark.parametrize("tiles", [{"splits": 1, "block_n": 16}, {"splits": 3, "block_n": 16}],
                         ids=["unsplit", "3-splits"])
def test_tensor_core_loop_matches_reference_fp16(tiles):
    """16-bit pools take the tl.dot loop (fp16 here: the interpreter's bf16 tl.dot is wrong): ragged
    windows up to a wrapped context of 40, blocks of 16 positions, against the reference and the FMA loop."""
    context, slots = 40, 6
    cache = PagedKVCache(1, HEADS, HEAD_DIM, context, slots, page_size=PAGE_SIZE, dtype=torch.float16)
    for slot in range(slots):
        cache.admit(slot)
    cache.k_pool.normal_()
    cache.v_pool.normal_()
    cache.positions.copy_(torch.tensor([0, 5, 17, 39, 40, 97]))
    cache.set_exec_mask(torch.ones(slots, dtype=torch.bool))
    qkv = torch.randn(slots, 3 * WIDTH).half()

    def run(**kwargs):
        k_pool, v_pool = cache.k_pool[0].clone(), cache.v_pool[0].clone()
        args = (qkv, k_pool, v_pool, cache.page_table, cache.positions, cache.exec_mask, context, MAX_PERIOD)
        out = torch.full((slots, WIDTH), float("nan"), dtype=torch.float16)
        if kwargs.pop("reference", False):
            return paged_attention_ref(*args, out=out).float()
        return paged_attention(*args, out=out, **kwargs).float()

    expected = run(reference=True)
    sizes = paged_attention_workspace_size(slots, HEADS, HEAD_DIM, context, tiles)
    dot = run(tiles=tiles, workspace=SplitWorkspace(*sizes, "cpu"))
    fma = run(tiles={**tiles, "dot": False}, workspace=SplitWorkspace(*sizes, "cpu"))
    scores_only = run(tiles={**tiles, "dot_values": False}, workspace=SplitWorkspace(*sizes, "cpu"))
    assert rel_err(dot, expected) < 2e-3
    assert rel_err(dot, fma) < 2e-3
    assert rel_err(scores_only, expected) < 2e-3
    with pytest.raises(ValueError, match="tensor-core loop"):
        run(tiles={**tiles, "block_n": 8, "dot": True})


@triton.jit
def _to_cache_probe_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _to_cache(tl.load(x_ptr + offs), out_ptr.dtype.element_ty, True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_e4m3_rounding_is_torchs(device):
    """The kernel's e4m3 rounding against torch's cast, bit for bit: every finite e4m3 value, the midpoints
    between neighbours (ties go to even), points just off them, both signs and zeros, and values past 448."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].sort().values
    middles = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([middles * (1 + 2.0 ** -20), middles * (1 - 2.0 ** -20)])
    values = torch.cat([grid, middles, near, torch.tensor([449.0, 464.0, 1e6, 2.0 ** -12, 2.0 ** -10])])
    values = torch.cat([values, -values, torch.tensor([0.0, -0.0])])
    x = torch.cat([values, torch.zeros(-len(values) % 256)]).to(device)
    out = torch.empty(len(x), dtype=torch.float8_e4m3fn, device=device)
    _to_cache_probe_kernel[(len(x) // 256,)](x, out, BLOCK=256)
    assert torch.equal(out.view(torch.uint8), to_cache_dtype(x, torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("activation, loop", [(torch.float32, {}), (torch.float16, {}),
                                              (torch.float16, {"dot_values": False})],
                         ids=["fp32-fma", "fp16-tensor-core", "fp16-tensor-core-scores"])
@pytest.mark.parametrize("tiles", [{"splits": 1, "block_n": 16}, {"splits": 3, "block_n": 16}],
                         ids=["unsplit", "3-splits"])
def test_fp8_pools_match_reference(activation, loop, tiles):
    """An 8-bit cache (e4m3): the new rows are stored with the reference's bits (rounded from the activation
    dtype, values past +-448 saturated), the rest of the pools untouched, and attention over the widened
    values matches the reference, on ragged windows up to a wrapped context of 40."""
    context, slots = 40, 6
    cache = PagedKVCache(1, HEADS, HEAD_DIM, context, slots, page_size=PAGE_SIZE, dtype=torch.float8_e4m3fn)
    for slot in range(slots):
        cache.admit(slot)
    cache.k_pool.copy_(torch.randn(cache.k_pool.shape).to(torch.float8_e4m3fn))
    cache.v_pool.copy_(torch.randn(cache.v_pool.shape).to(torch.float8_e4m3fn))
    cache.positions.copy_(torch.tensor([0, 5, 17, 39, 40, 97]))
    cache.set_exec_mask(torch.ones(slots, dtype=torch.bool))
    qkv = torch.randn(slots, 3 * WIDTH)
    qkv[:, 2 * WIDTH::7] *= 1000.0  # values beyond e4m3's range
    qkv = qkv.to(activation)

    def run(reference: bool):
        k_pool, v_pool = cache.k_pool[0].clone(), cache.v_pool[0].clone()
        args = (qkv, k_pool, v_pool, cache.page_table, cache.positions, cache.exec_mask, context, MAX_PERIOD)
        out = torch.full((slots, WIDTH), float("nan"), dtype=activation)
        if reference:
            return paged_attention_ref(*args, out=out).float(), k_pool, v_pool
        sizes = paged_attention_workspace_size(slots, HEADS, HEAD_DIM, context, tiles)
        return (paged_attention(*args, out=out, tiles={**tiles, **loop},
                                workspace=SplitWorkspace(*sizes, "cpu")).float(), k_pool, v_pool)

    expected, expected_k, expected_v = run(reference=True)
    got, k_pool, v_pool = run(reference=False)
    assert torch.equal(k_pool.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(v_pool.view(torch.uint8), expected_v.view(torch.uint8))
    assert (v_pool.float().abs() == 448).any(), "the saturated values reached the pool"
    assert rel_err(got, expected) < (1e-5 if activation == torch.float32 else 2e-3)


def test_int64_positions_give_the_same_bits():
    cache, qkv = ragged_batch(RAGGED)
    narrow = call(cache, qkv, tiles=SPLIT)
    args = (qkv, *cache.layer(0), cache.page_table, cache.positions.long(), cache.exec_mask, CONTEXT,
            MAX_PERIOD)
    assert torch.equal(paged_attention(*args, tiles=SPLIT), narrow)


def test_workspace_size_suffices_and_is_checked():
    batch = len(RAGGED)
    assert paged_attention_workspace_size(batch, HEADS, HEAD_DIM, CONTEXT) == (0, 0)
    assert paged_attention_workspace_size(batch, HEADS, HEAD_DIM, CONTEXT, {"splits": 1}) == (0, 0)
    sizes = paged_attention_workspace_size(batch, HEADS, HEAD_DIM, CONTEXT, {"splits": 3})
    assert sizes == (batch * HEADS * 3 * (HEAD_DIM + 2), batch * HEADS)
    cache, qkv = ragged_batch(RAGGED)
    exact = SplitWorkspace(*sizes, "cpu")
    exact.partials.fill_(float("nan"))
    out = call(cache, qkv, tiles={"splits": 3, "block_n": 2}, workspace=exact)
    assert rel_err(out, call(cache, qkv, reference=True)) < 1e-5
    with pytest.raises(ValueError, match="workspace too small"):
        call(cache, qkv, tiles={"splits": 3}, workspace=SplitWorkspace(sizes[0] - 1, sizes[1], "cpu"))


def test_default_plan_for_helium_on_an_h200():
    """The grid the docstring promises with 132 SMs (4 programs each), without the tuned table."""
    programs = 4 * 132
    plans = {batch: _resolve_tiles(batch, 32, 128, 3000, {}, programs) for batch in (1, 8, 32, 64)}
    assert plans == {1: (64, 16, 4, None), 8: (64, 2, 4, None), 32: (64, 1, 4, None), 64: (64, 1, 4, None)}


def test_candidate_tiles_all_match_reference():
    for batch in (1, 8, 64):
        assert 1 < len(paged_attention_candidate_tiles(batch, 32, 128, 3000)) <= 10
    cache, qkv = ragged_batch([2, 12, 40])
    expected = call(cache, qkv, reference=True)
    candidates = paged_attention_candidate_tiles(3, HEADS, HEAD_DIM, CONTEXT)
    assert 1 < len(candidates) <= 10
    for tiles in candidates:
        assert rel_err(call(cache, qkv, tiles=tiles), expected) < 1e-5, tiles


def test_argument_checks():
    cache, qkv = ragged_batch([0, 5])
    k_pool, v_pool = cache.layer(0)
    with pytest.raises(ValueError, match="cannot hold a window"):
        paged_attention(qkv, k_pool, v_pool, cache.page_table[:, :2], cache.positions, cache.exec_mask,
                        CONTEXT, MAX_PERIOD)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(qkv, k_pool, v_pool, cache.page_table.long(), cache.positions, cache.exec_mask,
                        CONTEXT, MAX_PERIOD)
    with pytest.raises(ValueError, match="cover the 2 slots"):
        paged_attention(qkv, k_pool, v_pool, cache.page_table, cache.positions[:1], cache.exec_mask,
                        CONTEXT, MAX_PERIOD)
    with pytest.raises(ValueError, match="power of two"):
        call(cache, qkv, tiles={"block_n": 3})


def test_memory_math():
    assert PagedKVCache.bytes_per_slot(32, 32, 128, 3000) == 1_585_446_912
    cache = PagedKVCache(3, HEADS, HEAD_DIM, CONTEXT, 5, page_size=PAGE_SIZE)
    pool_bytes = (cache.k_pool.numel() + cache.v_pool.numel()) * cache.k_pool.element_size()
    assert pool_bytes == 5 * PagedKVCache.bytes_per_slot(3, HEADS, HEAD_DIM, CONTEXT, PAGE_SIZE)


HELIUM = {"heads": 32, "head_dim": 128, "context": 3000}


def helium_cache(positions: list[int], layers: int = 1, dtype: torch.dtype = torch.bfloat16) -> PagedKVCache:
    cache = PagedKVCache(layers, HELIUM["heads"], HELIUM["head_dim"], HELIUM["context"], len(positions),
                         dtype=dtype, device="cuda")
    for slot in range(len(positions)):
        cache.admit(slot)
    cache.k_pool.copy_(torch.randn(cache.k_pool.shape, device="cuda").to(dtype))
    cache.v_pool.copy_(torch.randn(cache.v_pool.shape, device="cuda").to(dtype))
    cache.positions.copy_(torch.tensor(positions))
    return cache


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_paged_attention_bf16_at_helium_shapes(batch):
    width = HELIUM["heads"] * HELIUM["head_dim"]
    generator = torch.Generator().manual_seed(batch)
    positions = torch.randint(0, 8000, (batch,), generator=generator).tolist()
    positions[:4] = [0, 99, 2999, 3000][:batch]
    cache = helium_cache(positions)
    exec_mask = torch.ones(batch, dtype=torch.bool, device="cuda")
    exec_mask[batch // 2] = batch == 1
    cache.set_exec_mask(exec_mask)
    twin_k, twin_v = cache.k_pool.clone(), cache.v_pool.clone()
    qkv = torch.randn(batch, 3 * width, device="cuda").to(torch.bfloat16)
    args = (cache.page_table, cache.positions, cache.exec_mask, HELIUM["context"], 10000.0)
    out = torch.full((batch, width), float("nan"), device="cuda", dtype=torch.bfloat16)
    paged_attention(qkv, *cache.layer(0), *args, out=out)
    expected = paged_attention_ref(qkv, twin_k[0], twin_v[0], *args,
                                   out=torch.full_like(out, float("nan")))
    running = cache.exec_mask[:batch]
    assert rel_err(out[running], expected[running]) <= 1e-2
    assert out[~running].isnan().all()
    # The new rows differ by RoPE's rounding at most; nothing else in the pools changes.
    slots = running.nonzero()[:, 0]
    pos = cache.positions[slots].long()
    ring_index = (pos[:, None] // cache.page_size) % cache.pages_per_slot
    pages = cache.page_table[slots].long().gather(1, ring_index)[:, 0]
    rows = pos % cache.page_size
    assert rel_err(cache.k_pool[0, pages, :, rows], twin_k[0, pages, :, rows]) < 1e-2
    twin_k[0, pages, :, rows] = cache.k_pool[0, pages, :, rows]
    assert torch.equal(cache.k_pool, twin_k) and torch.equal(cache.v_pool, twin_v)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [None, {"dot_values": False}], ids=["plan", "scores-on-tensor-cores"])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_paged_attention_fp8_cache_at_helium_shapes(batch, tiles):
    """bf16 activations on an e4m3 cache (the tensor-core loop on tiles widened to fp16, or only the scores
    on the tensor cores): the reference's output and stored bits."""
    width = HELIUM["heads"] * HELIUM["head_dim"]
    positions = torch.randint(0, 8000, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    positions[:4] = [0, 99, 2999, 3000][:batch]
    cache = helium_cache(positions, dtype=torch.float8_e4m3fn)
    cache.set_exec_mask(torch.ones(batch, dtype=torch.bool, device="cuda"))
    twin_k, twin_v = cache.k_pool.clone(), cache.v_pool.clone()
    qkv = torch.randn(batch, 3 * width, device="cuda").to(torch.bfloat16)
    args = (cache.page_table, cache.positions, cache.exec_mask, HELIUM["context"], 10000.0)
    out = paged_attention(qkv, *cache.layer(0), *args, tiles=tiles,
                          out=torch.full((batch, width), float("nan"), device="cuda", dtype=torch.bfloat16))
    expected = paged_attention_ref(qkv, twin_k[0], twin_v[0], *args)
    assert rel_err(out, expected) <= 1e-2
    assert torch.equal(cache.v_pool.view(torch.uint8), twin_v.view(torch.uint8))
    # Keys: RoPE in fp32 may round one new key element differently before the 8-bit rounding.
    differ = cache.k_pool.view(torch.uint8) != twin_k.view(torch.uint8)
    assert differ.float().mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["triton", "cuda"])
def test_paged_attention_replays_in_a_cuda_graph(kernel):
    """set_exec_mask, two layers and advance captured once, replayed for 5 steps with new qkv, match
    the same steps run eagerly by the reference on a twin cache; the Triton kernel, or the CUDA extension's
    (cuda_ext.paged_attention, with its own default split count and workspace)."""
    if kernel == "cuda":
        assert cuda_ext.available(), cuda_ext.unavailable_reason()
    attention = paged_attention if kernel == "triton" else cuda_ext.paged_attention
    batch, layers = 4, 2
    width = HELIUM["heads"] * HELIUM["head_dim"]
    cache = helium_cache([0, 2998, 5000, 17], layers)
    twin = helium_cache([0, 2998, 5000, 17], layers)
    twin.k_pool.copy_(cache.k_pool)
    twin.v_pool.copy_(cache.v_pool)
    exec_mask = torch.tensor([True, True, False, True], device="cuda")
    qkv = torch.empty(layers, batch, 3 * width, device="cuda", dtype=torch.bfloat16)
    outs = torch.empty(layers, batch, width, device="cuda", dtype=torch.bfloat16)
    workspace = SplitWorkspace(*ops.paged_attention_workspace_size(batch, HELIUM["heads"], HELIUM["head_dim"],
                                                                   HELIUM["context"]), "cuda")

    def step():
        cache.set_exec_mask(exec_mask)
        for layer in range(layers):
            attention(qkv[layer], *cache.layer(layer), cache.page_table, cache.positions, cache.exec_mask,
                      HELIUM["context"], 10000.0, out=outs[layer], workspace=workspace)
        cache.advance()

    qkv.normal_()
    graph = graph_after_warmup(step, cache.positions, cache.k_pool, cache.v_pool)
    for _ in range(5):
        qkv.normal_()
        graph.replay()
        twin.set_exec_mask(exec_mask)
        for layer in range(layers):
            expected = paged_attention_ref(qkv[layer], *twin.layer(layer), twin.page_table, twin.positions,
                                           twin.exec_mask, HELIUM["context"], 10000.0)
            assert rel_err(outs[layer][exec_mask], expected[exec_mask]) <= 1e-2
        twin.advance()
    assert torch.equal(cache.positions, twin.positions)
    assert cache.positions.tolist() == [5, 2998 + 5, 5000, 17 + 5]


def test_an_8bit_cache_takes_its_own_tuned_plan_and_sizes_its_workspace_for_it(monkeypatch):
    """Plans keyed by the pools' dtype: an e4m3 cache takes its own where the table has one, else the 16-bit
    cache's; the workspace size follows the plan of the dtype it is asked for."""
    from moshi_fast.kernels import paged_attention as paged

    plans = {"32,128,3000": {"8": {"block_n": 64, "splits": 2, "num_warps": 4, "num_stages": 3}},
             "32,128,3000,float8_e4m3fn": {"8": {"block_n": 256, "splits": 4, "num_warps": 8, "num_stages": 2}}}
    monkeypatch.setattr(paged, "tuned_tiles", lambda op, shape, batch: dict(plans[shape]["8"]) if shape in plans
                        else None)
    fp8 = torch.float8_e4m3fn
    assert paged._resolve_tiles(8, 32, 128, 3000, None, 1, fp8) == (256, 4, 8, 2)
    assert paged._resolve_tiles(8, 32, 128, 3000, None, 1, torch.bfloat16) == (64, 2, 4, 3)
    assert paged._resolve_tiles(8, 32, 128, 3000, None, 1) == (64, 2, 4, 3)
    assert paged_attention_workspace_size(8, 32, 128, 3000, kv_dtype=fp8) == (8 * 32 * 4 * 130, 8 * 32)
    assert paged_attention_workspace_size(8, 32, 128, 3000) == (8 * 32 * 2 * 130, 8 * 32)
    del plans["32,128,3000,float8_e4m3fn"]
    assert paged._resolve_tiles(8, 32, 128, 3000, None, 1, fp8) == (64, 2, 4, 3)
