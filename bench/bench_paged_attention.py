"""paged_attention at Helium's shapes (32 heads x 128, window 3000, pages of 16, bf16, one new token per
slot; the pools in bf16 or in e4m3) beside Kyutai's path: the ring write and torch SDPA over a dense [B, H, 3000, D] ring under the window
mask, which reads the whole ring however few keys are live (Kyutai's RoPE, compiled, is left out of it). The CUDA
extension's kernel (bf16 pools) is timed on the same cases, at its default split count and two others.

Successive calls cycle through LAYERS layers' pools and rings, as the engine's 32 layers do, so that one
slot's full window (49 MB a layer) is not served from the 50 MB L2 at B = 1.
"""
import itertools

import pytest
import torch

from moshi_fast import cuda_ext
from moshi_fast.cache import PagedKVCache
from moshi_fast.kernels._utils import SplitWorkspace
from moshi_fast.kernels.paged_attention import paged_attention, paged_attention_workspace_size

GPU = torch.cuda.is_available()
HEADS, HEAD_DIM, CONTEXT, PAGE_SIZE = (32, 128, 3000, 16) if GPU else (2, 16, 24, 4)
DTYPE = torch.bfloat16 if GPU else torch.float32
LAYERS = 4 if GPU else 1


FULL_WINDOW_POSITION = 2 * CONTEXT + 17
"""A full window past the ring's first laps, as in a long conversation."""


def filled_cache(batch: int, kv_dtype: torch.dtype, position: int, device) -> PagedKVCache:
    """LAYERS layers of `batch` admitted, running slots at `position`, every page random."""
    cache = PagedKVCache(LAYERS, HEADS, HEAD_DIM, CONTEXT, batch, page_size=PAGE_SIZE, dtype=kv_dtype,
                         device=device)
    for slot in range(batch):
        cache.admit(slot)
    cache.k_pool.copy_(torch.randn(cache.k_pool.shape, device=device).to(kv_dtype))
    cache.v_pool.copy_(torch.randn(cache.v_pool.shape, device=device).to(kv_dtype))
    cache.positions.fill_(position)
    cache.set_exec_mask(torch.ones(batch, dtype=torch.bool, device=device))
    return cache


def kyutai_path(qkv: torch.Tensor, batch: int, position: int, device):
    """Kyutai's path on LAYERS dense rings: the ring write of the new key and value, then SDPA under the window
    mask."""
    rings = torch.randn(LAYERS, 2, batch, HEADS, CONTEXT, HEAD_DIM, device=device, dtype=DTYPE)
    ring_slots = torch.arange(CONTEXT, device=device)
    ring_pos = position - (position - ring_slots) % CONTEXT
    mask = ((ring_pos >= 0) & (position - ring_pos < CONTEXT)).expand(batch, 1, 1, CONTEXT)
    write_index = torch.full((batch, HEADS, 1, HEAD_DIM), position % CONTEXT, device=device)
    torch_layers = itertools.cycle(range(LAYERS))

    def torch_path():
        ring_k, ring_v = rings[next(torch_layers)]
        q, k, v = qkv.view(batch, 3, HEADS, 1, HEAD_DIM).unbind(1)
        ring_k.scatter_(2, write_index, k)
        ring_v.scatter_(2, write_index, v)
        return torch.nn.functional.scaled_dot_product_attention(q, ring_k, ring_v, mask)

    return torch_path


def attention_case(batch: int, filled: int, kv_dtype: torch.dtype, device):
    """(cache, qkv, out, position, live keys, bytes moved) of one case."""
    width = HEADS * HEAD_DIM
    position = filled - 1 if filled < CONTEXT else FULL_WINDOW_POSITION
    cache = filled_cache(batch, kv_dtype, position, device)
    qkv = torch.randn(batch, 3 * width, device=device, dtype=DTYPE)
    out = torch.empty(batch, width, device=device, dtype=DTYPE)
    live_keys = min(position + 1, CONTEXT)
    moved = kv_dtype.itemsize * 2 * batch * live_keys * width + DTYPE.itemsize * (qkv.numel() + out.numel())
    return cache, qkv, out, position, live_keys, moved


@pytest.mark.parametrize("kv_dtype", [DTYPE, torch.float8_e4m3fn], ids=["kv-activation-dtype", "kv-fp8"])
@pytest.mark.parametrize("filled", [100, CONTEXT] if GPU else [5, CONTEXT])
@pytest.mark.parametrize("batch", [1, 8, 32, 64] if GPU else [2])
def test_paged_attention(measure, device, batch, filled, kv_dtype):
    """kv-fp8: the pools in e4m3 (half the bytes; the torch path beside it keeps its bf16 ring)."""
    cache, qkv, out, position, live_keys, moved = attention_case(batch, filled, kv_dtype, device)
    workspace = SplitWorkspace(*paged_attention_workspace_size(batch, HEADS, HEAD_DIM, CONTEXT), device)
    fast_layers = itertools.cycle(range(LAYERS))

    def fast():
        paged_attention(qkv, *cache.layer(next(fast_layers)), cache.page_table, cache.positions,
                        cache.exec_mask, CONTEXT, 10000.0, out=out, workspace=workspace)

    measure(fast, moved, kyutai_path(qkv, batch, position, device), op="paged_attention", batch=batch,
            filled=live_keys, heads=HEADS, head_dim=HEAD_DIM, context=CONTEXT, page_size=PAGE_SIZE,
            kv_dtype=str(kv_dtype).removeprefix("torch."))


@pytest.mark.skipif(not cuda_ext.available(),
                    reason=f"the CUDA extension is unavailable: {cuda_ext.unavailable_reason()}")
@pytest.mark.parametrize("splits", [0, 8, 24], ids=lambda s: f"splits-{s or 'default'}")
@pytest.mark.parametrize("filled", [100, CONTEXT])
@pytest.mark.parametrize("batch", [1, 8, 32, 64])
def test_paged_attention_cuda(measure, device, batch, filled, splits):
    """The CUDA extension's kernel (bf16 pools) on the cases of test_paged_attention's kv-activation-dtype, whose
    rows in the same run time the Triton kernel; splits: runs per (slot, head), 0 the default."""
    cache, qkv, out, position, live_keys, moved = attention_case(batch, filled, DTYPE, device)
    if splits and splits == cuda_ext.paged_attention_splits(batch, HEADS, CONTEXT, device):
        pytest.skip("the default split count is timed as splits-default")
    workspace = SplitWorkspace(*cuda_ext.paged_attention_workspace_size(batch, HEADS, CONTEXT, splits), device)
    layers = itertools.cycle(range(LAYERS))

    def fast():
        cuda_ext.paged_attention(qkv, *cache.layer(next(layers)), cache.page_table, cache.positions,
                                 cache.exec_mask, CONTEXT, 10000.0, out=out, workspace=workspace, splits=splits)

    measure(fast, moved, kyutai_path(qkv, batch, position, device), op="paged_attention_cuda", batch=batch,
            filled=live_keys, heads=HEADS, head_dim=HEAD_DIM, context=CONTEXT, page_size=PAGE_SIZE,
            kv_dtype=str(DTYPE).removeprefix("torch."),
            splits=splits or cuda_ext.paged_attention_splits(batch, HEADS, CONTEXT, device))
