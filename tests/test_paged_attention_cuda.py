"""The CUDA extension's paged decode attention (csrc/paged_attention_kernel.cuh, `cuda_ext.paged_attention`) on the
GPU: the reference's outputs and pool writes at Helium's shapes (full, short and wrapped windows, a slot that does
not run, every split count the default picks and odd ones), small pages and few heads, int32 and int64 positions,
repeatable splits with their counters back at zero, the Triton kernel's outputs, argument checks, and ops' dispatch
under ops.CUDA_PAGED_ATTENTION (its CUDA-graph replays are tests/test_paged_attention.py's). On the CPU: the split
arithmetic and that ops never reaches the extension there."""
import pytest
import torch

from moshi_fast import cuda_ext, ops
from moshi_fast.cache import PagedKVCache
from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.paged_attention import paged_attention as triton_paged_attention
from moshi_fast.kernels.paged_attention import paged_attention_ref

from .helpers import rel_err, run_eagerly_then_replayed

HEADS, HEAD_DIM, CONTEXT, MAX_PERIOD = 32, 128, 3000, 10000.0
WIDTH = HEADS * HEAD_DIM
PAGED_TOO_MANY_SPLITS = cuda_ext.PAGED_MAX_SPLITS + 1


@pytest.fixture(scope="module")
def extension():
    """The extension on the GPU machine, where its tests fail, rather than skip, when it cannot load."""
    assert cuda_ext.available(), cuda_ext.unavailable_reason()


def filled_cache(positions: list[int], heads: int = HEADS, context: int = CONTEXT, page_size: int = 16,
                 seed: int = 0) -> PagedKVCache:
    """Every slot admitted at the given positions, the pools random bf16."""
    cache = PagedKVCache(1, heads, HEAD_DIM, context, len(positions), page_size=page_size, dtype=torch.bfloat16,
                         device="cuda")
    for slot in range(len(positions)):
        cache.admit(slot)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    cache.k_pool.copy_(torch.randn(cache.k_pool.shape, device="cuda", generator=generator))
    cache.v_pool.copy_(torch.randn(cache.v_pool.shape, device="cuda", generator=generator))
    cache.positions.copy_(torch.tensor(positions))
    return cache


def new_rows(cache: PagedKVCache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages, rows) of the given slots' current positions."""
    position = cache.positions[slots].long()
    ring_index = (position[:, None] // cache.page_size) % cache.pages_per_slot
    return cache.page_table[slots].long().gather(1, ring_index)[:, 0], position % cache.page_size


def check_against_reference(cache: PagedKVCache, exec_mask: torch.Tensor, context: int, splits: int = 0,
                            seed: int = 1) -> torch.Tensor:
    """Runs the CUDA kernel and the reference (on copies of the pools) on the same new tokens; asserts the outputs
    agree, rows of slots that do not run stay untouched, and the pools differ only in the new keys' RoPE rounding.
    Returns the CUDA kernel's output."""
    batch, heads = cache.positions.shape[0], cache.k_pool.shape[2]
    cache.set_exec_mask(exec_mask)
    twin_k, twin_v = cache.k_pool[0].clone(), cache.v_pool[0].clone()
    generator = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(batch, 3 * heads * HEAD_DIM, device="cuda", generator=generator).to(torch.bfloat16)
    args = (cache.page_table, cache.positions, cache.exec_mask, context, MAX_PERIOD)
    out = torch.full((batch, heads * HEAD_DIM), float("nan"), device="cuda", dtype=torch.bfloat16)
    assert cuda_ext.paged_attention(qkv, *cache.layer(0), *args, out=out, splits=splits) is out
    expected = paged_attention_ref(qkv, twin_k, twin_v, *args, out=torch.full_like(out, float("nan")))
    running = cache.exec_mask[:batch]
    assert rel_err(out[running], expected[running]) <= 1e-2
    assert out[~running].isnan().all()
    slots = running.nonzero()[:, 0]
    pages, rows = new_rows(cache, slots)
    k_pool, v_pool = cache.layer(0)
    assert rel_err(k_pool[pages, :, rows], twin_k[pages, :, rows]) < 1e-2
    twin_k[pages, :, rows] = k_pool[pages, :, rows]
    assert torch.equal(k_pool, twin_k) and torch.equal(v_pool, twin_v)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [0, 1, 3, 16, 24], ids=lambda s: f"splits-{s or 'default'}")
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_matches_reference_at_helium_shapes(extension, batch, splits):
    """A first token, a short window, exactly the context, one past it and wrapped rings; one slot sits out."""
    positions = torch.randint(0, 8000, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    positions[:5] = [0, 99, 2999, 3000, 17][:batch]
    cache = filled_cache(positions, seed=batch)
    exec_mask = torch.ones(batch, dtype=torch.bool, device="cuda")
    exec_mask[batch // 2] = batch == 1
    check_against_reference(cache, exec_mask, CONTEXT, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 4, 64])
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_small_windows_pages_and_heads_match_reference(extension, page_size, splits):
    """Two heads, a window of 37: runs that start and end inside pages, pages of one row and pages longer than
    a run, windows shorter than a group of 16 positions."""
    positions = [0, 1, 3, 15, 16, 36, 37, 100, 1234]
    cache = filled_cache(positions, heads=2, context=37, page_size=page_size, seed=page_size)
    check_against_reference(cache, torch.ones(len(positions), dtype=torch.bool, device="cuda"), 37, splits)


@pytest.mark.gpu
def test_int64_positions_give_the_same_bits(extension):
    positions = [5, 2999, 4321]
    outs, pools = [], []
    for dtype in (torch.int32, torch.int64):
        cache = filled_cache(positions)
        cache.set_exec_mask(torch.ones(len(positions), dtype=torch.bool, device="cuda"))
        qkv = torch.randn(len(positions), 3 * WIDTH, device="cuda",
                          generator=torch.Generator(device="cuda").manual_seed(7)).to(torch.bfloat16)
        outs.append(cuda_ext.paged_attention(qkv, *cache.layer(0), cache.page_table, cache.positions.to(dtype),
                                             cache.exec_mask, CONTEXT, MAX_PERIOD))
        pools.append(cache.k_pool.clone())
    assert torch.equal(outs[0], outs[1]) and torch.equal(pools[0], pools[1])


@pytest.mark.gpu
def test_splits_repeat_bitwise_and_leave_the_counters_at_zero(extension):
    """The same call twice (the new token rewritten with the same bits) gives the same bits; the merge resets
    every counter; the Triton kernel agrees to rounding."""
    positions = [2999, 12, 6000, 300]
    cache = filled_cache(positions)
    cache.set_exec_mask(torch.ones(len(positions), dtype=torch.bool, device="cuda"))
    qkv = torch.randn(len(positions), 3 * WIDTH, device="cuda").to(torch.bfloat16)
    args = (qkv, *cache.layer(0), cache.page_table, cache.positions, cache.exec_mask, CONTEXT, MAX_PERIOD)
    workspace = SplitWorkspace(*cuda_ext.paged_attention_workspace_size(len(positions), HEADS, CONTEXT, 16), "cuda")
    first = cuda_ext.paged_attention(*args, workspace=workspace, splits=16)
    assert not workspace.counters.any()
    second = cuda_ext.paged_attention(*args, workspace=workspace, splits=16)
    assert torch.equal(first, second)
    assert not workspace.counters.any()
    assert rel_err(first, triton_paged_attention(*args)) <= 1e-2


def _helium_operands(batch: int = 2):
    cache = filled_cache([5, 40][:batch])
    cache.set_exec_mask(torch.ones(batch, dtype=torch.bool, device="cuda"))
    qkv = torch.randn(batch, 3 * WIDTH, device="cuda").to(torch.bfloat16)
    return {"qkv": qkv, "k_pool": cache.k_pool[0], "v_pool": cache.v_pool[0], "page_table": cache.page_table,
            "positions": cache.positions, "exec_mask": cache.exec_mask, "context": CONTEXT,
            "max_period": MAX_PERIOD}


@pytest.mark.gpu
@pytest.mark.parametrize("change, error", [
    (lambda a: a.update(qkv=a["qkv"].cpu()), ValueError),
    (lambda a: a.update(qkv=a["qkv"].float()), TypeError),
    (lambda a: a.update(qkv=a["qkv"][:, :-8]), ValueError),
    (lambda a: a.update(k_pool=a["k_pool"][..., :64], v_pool=a["v_pool"][..., :64]), ValueError),
    (lambda a: a.update(v_pool=a["v_pool"].float()), TypeError),
    (lambda a: a.update(v_pool=a["v_pool"][:, :, :8]), ValueError),
    (lambda a: a.update(k_pool=a["k_pool"][:, :, :12], v_pool=a["v_pool"][:, :, :12]), ValueError),
    (lambda a: a.update(page_table=a["page_table"].long()), TypeError),
    (lambda a: a.update(page_table=a["page_table"][:, :10]), ValueError),
    (lambda a: a.update(positions=a["positions"].float()), TypeError),
    (lambda a: a.update(exec_mask=a["exec_mask"][:1]), ValueError),
    (lambda a: a.update(out=torch.empty(2, WIDTH + 1, device="cuda", dtype=torch.bfloat16)), ValueError),
    (lambda a: a.update(splits=PAGED_TOO_MANY_SPLITS), ValueError),
    (lambda a: a.update(workspace=SplitWorkspace(10, 1, "cuda"), splits=4), ValueError),
], ids=["cpu-qkv", "fp32-qkv", "qkv-width", "head-dim-64", "fp32-v-pool", "pool-shapes-differ",
        "page-size-12", "int64-table", "ring-too-short", "float-positions", "mask-too-short", "out-width",
        "too-many-splits", "workspace-too-small"])
def test_bad_arguments_raise(extension, change, error):
    arguments = _helium_operands()
    change(arguments)
    with pytest.raises(error):
        cuda_ext.paged_attention(**arguments)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, splits", [(1, 0), (3, 0), (8, 3)])
def test_reads_before_the_wait_give_the_same_bits_after_the_qkv_product(extension, batch, splits):
    """reads_before_wait (ops.PAGED_ATTENTION_READS_BEFORE_WAIT): Helium's qkv product on the CUDA GEMV, which lets
    the attention start after its own wait, then the attention reading its window before its wait, eagerly and as
    a captured graph replayed twice: the same output and pools, bit for bit, as the attention reading after the wait;
    the row of a slot that sits out stays untouched."""
    positions = [2999, 17, 5000, 3000, 1, 640, 2048, 7777][:batch]
    results = []
    for early in (False, True):
        cache = filled_cache(positions, seed=3)
        mask = torch.ones(batch, dtype=torch.bool, device="cuda")
        mask[-1] = batch == 1
        cache.set_exec_mask(mask)
        generator = torch.Generator(device="cuda").manual_seed(5)
        x = torch.randn(batch, WIDTH, device="cuda", generator=generator).to(torch.bfloat16)
        weight = (torch.randn(3 * WIDTH, WIDTH, device="cuda", generator=generator) * WIDTH ** -0.5).to(torch.bfloat16)
        qkv = torch.empty(batch, 3 * WIDTH, device="cuda", dtype=torch.bfloat16)
        out = torch.full((batch, WIDTH), float("nan"), device="cuda", dtype=torch.bfloat16)
        workspace = SplitWorkspace(*cuda_ext.paged_attention_workspace_size(batch, HEADS, CONTEXT, splits), "cuda")

        def step():
            cuda_ext.gemv(x, weight, None, qkv)
            cuda_ext.paged_attention(qkv, *cache.layer(0), cache.page_table, cache.positions, cache.exec_mask,
                                     CONTEXT, MAX_PERIOD, out=out, workspace=workspace, splits=splits,
                                     reads_before_wait=early)
        if early:
            run_eagerly_then_replayed(step)
        else:
            step()
            torch.cuda.synchronize()
        results.append((out.clone(), *cache.layer(0)))
    (out, k_pool, v_pool), (early_out, early_k, early_v) = results
    assert out[~mask].isnan().all() and early_out[~mask].isnan().all()
    assert torch.equal(early_out[mask], out[mask])
    assert torch.equal(early_k, k_pool) and torch.equal(early_v, v_pool)


@pytest.mark.gpu
def test_ops_dispatches_to_the_extension_only_when_switched_on(extension, monkeypatch):
    calls = []
    original = cuda_ext.launch_paged_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cuda_ext, "launch_paged_attention", spy)
    monkeypatch.setattr(ops, "CUDA_PAGED_ATTENTION", False)
    operands = _helium_operands()
    triton_args = {**operands, "k_pool": operands["k_pool"].clone(), "v_pool": operands["v_pool"].clone()}
    workspace = SplitWorkspace(*ops.paged_attention_workspace_size(2, HEADS, HEAD_DIM, CONTEXT), "cuda")
    default = ops.paged_attention(**triton_args, workspace=workspace)
    assert not calls
    monkeypatch.setattr(ops, "CUDA_PAGED_ATTENTION", True)
    assert ops.uses_cuda_paged_attention(*(operands[k] for k in ("qkv", "k_pool", "v_pool", "page_table",
                                                                  "positions", "exec_mask", "context")), None)
    switched = ops.paged_attention(**operands, workspace=workspace)
    assert calls == [1]
    assert rel_err(switched, default) <= 1e-2
    # The workspace ops sizes serves both kernels' default plans.
    cuda_need = cuda_ext.paged_attention_workspace_size(2, HEADS, CONTEXT)
    assert workspace.partials.numel() >= cuda_need[0] and workspace.counters.numel() >= cuda_need[1]


def test_default_splits_and_chunks(monkeypatch):
    """On 132 SMs: 16 runs of 192 positions for one conversation of Helium, 2 at eight, 1 from 17 on; no run
    shorter than 128 positions at a full window; runs are whole groups of 16; one run needs no workspace."""
    monkeypatch.setattr("moshi_fast.kernels._utils.parallel_sms", lambda device=None: 132)
    wanted = {1: 16, 2: 8, 8: 2, 16: 1, 17: 1, 64: 1}
    assert {batch: cuda_ext.paged_attention_splits(batch, HEADS, CONTEXT) for batch in wanted} == wanted
    assert cuda_ext.paged_attention_splits(1, HEADS, 300) == 3
    assert cuda_ext.paged_attention_chunk(CONTEXT, 16) == 192
    assert cuda_ext.paged_attention_chunk(1, 16) == 16
    assert cuda_ext.paged_attention_chunk(37, 2) == 32
    assert cuda_ext.paged_attention_run_pages(CONTEXT, 1, 16) == 190 <= cuda_ext.PAGED_MAX_RUN_PAGES
    assert cuda_ext.paged_attention_workspace_size(2, HEADS, CONTEXT) == (2 * HEADS * 8 * 130, 2 * HEADS)
    assert cuda_ext.paged_attention_workspace_size(17, HEADS, CONTEXT) == (0, 0)


def test_ops_never_reaches_the_extension_on_the_cpu(monkeypatch):
    monkeypatch.setattr(ops, "CUDA_PAGED_ATTENTION", True)
    monkeypatch.setattr(cuda_ext, "launch_paged_attention", lambda *a, **k: pytest.fail("reached the extension"))
    cache = PagedKVCache(1, 2, HEAD_DIM, 37, 1, page_size=4, dtype=torch.float32)
    cache.admit(0)
    cache.set_exec_mask(torch.ones(1, dtype=torch.bool))
    qkv = torch.randn(1, 3 * 2 * HEAD_DIM)
    args = (qkv, *cache.layer(0), cache.page_table, cache.positions, cache.exec_mask, 37, MAX_PERIOD)
    assert not ops.uses_cuda_paged_attention(*args[:7], None)
    with ops.reference_ops():
        out = ops.paged_attention(*args)
    assert torch.isfinite(out).all()
