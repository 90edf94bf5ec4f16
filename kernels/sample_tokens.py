"""Token sampling on the GPU: Kyutai's temperature + top-k exponential race with the counter-based
noise of `moshi_fast.reference.sampling` (the spec), one launch, no host sync.

Shapes:
    logits       [B, V]   fp32 or bf16, any strides; V < 2**16 (text 32000, audio 2048)
    temperature  [B]      fp32; <= 0 means greedy for that slot
    top_k        [B]      integer, clamped to [1, min(max_top_k, V)] as the reference's mask does
    max_top_k             Python int, fixed per model (text 25, audio 250)
    seed, counter [B]     int64 (counter: the slot's frame index, read on the device, so a CUDA graph
                          replay after it advances draws fresh numbers)
    draw                  Python int (0 = text, 1 + k = audio codebook k)
    out          [B]      int64 token ids

One program per slot row; the row's ordered-integer keys (fp32 bits mapped so that signed integer
order is float order; bf16 keys keep only their 16 significant bits) stay in registers:
  1. Max and min key. A greedy slot (temperature <= 0), and a slot with top_k = 1, takes the first
     vocabulary id with the max key (torch.argmax's choice).
  2. Bisection for a key threshold with exactly k = top_k keys at or above it: the interval
     [lo, hi) keeps count(key >= lo) >= k > count(key >= hi); each pass counts the keys >= mid
     (one block reduction). The first FLOAT_PASSES passes split at the float midpoint of the
     interval's values (about 10 passes on random rows at the real shapes, against ~16 at key
     midpoints, which spend passes on the exponent bits), the later ones at the key midpoint (at most
     32 more, 16 for bf16). It stops when count(key >= lo) == k, or at hi = lo + 1 (the k-th value
     is tied).
  3. Compaction, streaming the row again (from L1/L2) in CHUNK pieces with one scan each: every key
     >= hi, then the first k - count(key >= hi) keys in [lo, hi) in vocabulary order, go to a
     per-row scratch list [B, BLOCK_K] (BLOCK_K = max_top_k rounded up to a power of two). Each entry
     packs (key, 0xFFFF - vocabulary id) into an int64, whose order is the rank order: logit
     descending, vocabulary id ascending.
  4. A candidate's rank is the number of entries above its own among the k (a [BLOCK_K, BLOCK_K]
     comparison); its logit is its key's float.
  5. Race: exp(logit / T - max_logit / T) / E(rank), E = -log(uniform(hash(seed, counter, draw,
     rank))) computed as the reference does, down to its sign: the top uniform rounds to 1.0 and
     its noise is -0.0, so that candidate's race is -inf and never wins, as in the reference. The
     reference's softmax normaliser, a common factor of every candidate, is left out. Argmax, lowest
     rank on ties; a NaN race (an underflowed weight over -0.0 noise) wins, as in torch.argmax.

Exactness: the token equals `sample`'s except when
  - two of the top k + 1 reference probabilities are equal (equal logits, or distinct logits that
    round to one probability): torch.topk's order among them is unspecified; here it is vocabulary
    order (greedy slots have no such caveat: both take the first maximum);
  - the two largest race values lie within a few float32 ulps (~1e-6 relative) of each other: the
    reference also multiplies by its normaliser, and its exp/log may round differently (on the GPU
    both use libdevice's expf/logf, the functions of torch's CUDA kernels; in the CPU interpreter,
    numpy's, up to 4 ulp from torch's CPU log). About one draw in a million by that argument; none
    in 1,840 tie-free random rows (text, audio and 3000-wide, fp32 and bf16) in the interpreter;
  - logits are NaN, or logit / temperature overflows.

Floor: the logits (B x V x 2 or 4 bytes) plus 36 bytes a slot: 64 KB for bf16 text at B = 1, a few
hundredths of a microsecond of HBM time. The kernel is latency-bound instead: about 10 dependent
passes, each a block reduction (a few hundred cycles) and, for the 32000-entry text row, ~0.8k
cycles of compares (64 keys a thread on 16 warps), then the compaction and the race. Expected on an
H200, unmeasured: a few microseconds, flat in B up to the SM count (one program per row). ptxas -v
for sm_90a at the default tiles: no spills in the bisection loop; ~90 bytes elsewhere for text,
none for audio. Graph-safe: every data-dependent value stays on the device; the scratch list is
allocated per call (from the graph's pool under capture).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from moshi_fast.reference.sampling import sample

from ._utils import await_previous_kernel, check_launch_devices, interpreting, next_pow2, pdl

FLOAT_PASSES = 16
"""Bisection passes that split at the float midpoint before falling back to the key midpoint."""
MAX_VOCAB = 1 << 16
"""Counts and vocabulary ids are packed into 16-bit fields."""
DTYPES = (torch.float32, torch.bfloat16)


class SampleTiles(NamedTuple):
    """Launch options: warps, and the entries a compaction step streams (a power of two)."""
    num_warps: int
    chunk: int


def sample_tokens_tiles(vocab: int) -> SampleTiles:
    """At most 64 row keys a thread: 4 warps up to 8192 entries, 16 for the 32000-entry text row;
    compaction chunks of 16 entries a thread (one chunk for the audio row, four for text). A full-row
    compaction chunk spills registers at the text row (ptxas -v, sm_90a)."""
    block_v = next_pow2(vocab, minimum=2)
    num_warps = min(16, max(4, block_v // (32 * 64)))
    return SampleTiles(num_warps, min(block_v, 16 * 32 * num_warps))


def sample_tokens_ref(logits, temperature, top_k, max_top_k, seed, counter, draw, out=None, tiles=None):
    """The spec, `moshi_fast.reference.sampling.sample`; `tiles` is accepted for the kernel's signature."""
    tokens = sample(logits, temperature, top_k, max_top_k, seed, counter, draw)
    if out is None:
        return tokens
    out.copy_(tokens)
    return out


@triton.jit
def _float_key(x, KEY_SHIFT: tl.constexpr):
    """int32 key of fp32 x whose signed order is the floats' order (negative floats count down from
    -1); -0.0 counts as +0.0 so that keys compare as the floats do."""
    bits = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> KEY_SHIFT


@triton.jit
def _key_float(key, KEY_SHIFT: tl.constexpr):
    """A float with this int32 key (its own value for a logit's key): the bits the shift dropped were
    ones for negative floats, zeros for positive ones, and the order map is its own inverse."""
    key32 = (key << KEY_SHIFT) | ((key >> 31) & ((1 << KEY_SHIFT) - 1))
    return (key32 ^ ((key32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32 (products wrap mod 2**32, as the reference emulates in int64)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _hash_bits(seed, counter, draw, ranks):
    """The reference's 32 noise bits (uint32) for int64 scalars seed and counter, int32 draw and
    uint32 ranks: `_combine(h, v) = _mix32((h ^ v) + golden)` over (seed low, seed high), counter,
    draw, rank."""
    h = _mix32((seed.to(tl.uint32) ^ (seed >> 32).to(tl.uint32)) + 0x9E3779B9)
    h = _mix32((h ^ counter.to(tl.uint32)) + 0x9E3779B9)
    h = _mix32((h ^ draw.to(tl.uint32)) + 0x9E3779B9)
    return _mix32((h ^ ranks) + 0x9E3779B9)


@triton.jit
def _exponential(bits, INTERPRETED: tl.constexpr):
    """Exp(1) variate -log(u), u = ((bits >> 8) + 0.5) / 2**24 in float32 as the reference rounds it.
    On the GPU libdevice's logf (tl.log is an approximation there)."""
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / (1 << 24))
    # Times -1, not unary minus (compiled as 0 - x): the top uniform rounds to 1.0, and the reference's
    # -log(1.0) is -0.0, which makes that candidate's race -inf; 0 - 0.0 would be +0.0 and +inf.
    if INTERPRETED:
        return tl.log(uniform) * -1.0
    else:
        return libdevice.log(uniform) * -1.0


@triton.jit
def _exp(x, INTERPRETED: tl.constexpr):
    """exp in float32: libdevice's expf on the GPU (tl.exp is ex2.approx there)."""
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _sample_tokens_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, seed_ptr, counter_ptr, candidates_ptr, out_ptr,
    VOCAB, TOP_K_CAP, DRAW,
    stride_logits_b, stride_logits_v, stride_temperature, stride_top_k, stride_seed, stride_counter,
    stride_candidates, stride_out,
    KEY_SHIFT: tl.constexpr, FLOAT_PASSES: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_logits_b
    vocab = tl.arange(0, BLOCK_V)
    in_row = vocab < VOCAB
    logits = tl.load(row_ptr + vocab * stride_logits_v, mask=in_row, other=0.0).to(tl.float32)
    # Padding lanes sit below every real key (the key of -inf included), so no threshold counts them.
    keys = tl.where(in_row, _float_key(logits, KEY_SHIFT), -2147483648)
    max_key = tl.max(keys, axis=0)
    temperature = tl.load(temperature_ptr + row * stride_temperature)
    top_k = tl.minimum(tl.maximum(tl.load(top_k_ptr + row * stride_top_k), 1), TOP_K_CAP).to(tl.int32)

    if (temperature <= 0) | (top_k == 1):
        token = tl.min(tl.where(keys == max_key, vocab, BLOCK_V), axis=0)
    else:
        lo = tl.min(tl.where(in_row, keys, 2147483647), axis=0)
        hi = max_key + 1
        lo_value = _key_float(lo, KEY_SHIFT)
        hi_value = _key_float(hi, KEY_SHIFT)
        # int64: the distance between keys spans up to 2**32.
        lo = lo.to(tl.int64)
        hi = hi.to(tl.int64)
        # A tensor even where VOCAB is compiled in as a constant (launch arguments equal to 1 are).
        count_lo = tl.full((), 0, tl.int32) + VOCAB
        count_hi = tl.full((), 0, tl.int32)
        passes = tl.full((), 0, tl.int32)
        while (count_lo != top_k) & (hi - lo > 1):
            float_mid = lo_value * 0.5 + hi_value * 0.5
            float_mid_key = _float_key(float_mid, KEY_SHIFT).to(tl.int64)
            use_float = (passes < FLOAT_PASSES) & (float_mid_key > lo) & (float_mid_key < hi)
            mid = tl.where(use_float, float_mid_key, lo + (hi - lo) // 2)
            mid_value = tl.where(use_float, float_mid, _key_float(mid.to(tl.int32), KEY_SHIFT))
            count = tl.sum((keys >= mid.to(tl.int32)).to(tl.int32), axis=0)
            enough = count >= top_k
            lo = tl.where(enough, mid, lo)
            lo_value = tl.where(enough, mid_value, lo_value)
            count_lo = tl.where(enough, count, count_lo)
            hi = tl.where(enough, hi, mid)
            hi_value = tl.where(enough, hi_value, mid_value)
            count_hi = tl.where(enough, count_hi, count)
            passes += 1

        # Compaction, streamed again in chunks (a full-row scatter spills registers): every key >= hi,
        # then the first (top_k - count_hi) keys in [lo, hi) in vocabulary order (all of them unless
        # the k-th value is tied). Both running counts come out of one scan, packed in 16-bit halves
        # (VOCAB < 2**16). Entries order candidates by (logit descending, vocabulary id ascending):
        # the rank order.
        quota = top_k - count_hi
        row_candidates = candidates_ptr + row.to(tl.int64) * stride_candidates
        above_total = tl.full((), 0, tl.int32)
        between_total = tl.full((), 0, tl.int32)
        for start in range(0, VOCAB, CHUNK):
            ids = start + tl.arange(0, CHUNK)
            in_chunk = ids < VOCAB
            chunk_logits = tl.load(row_ptr + ids * stride_logits_v, mask=in_chunk, other=0.0).to(tl.float32)
            chunk_keys = tl.where(in_chunk, _float_key(chunk_logits, KEY_SHIFT), -2147483648)
            above = chunk_keys >= hi.to(tl.int32)
            between = (chunk_keys >= lo.to(tl.int32)) & ~above
            flags = above.to(tl.int32) | (between.to(tl.int32) << 16)
            before = tl.cumsum(flags, axis=0) - flags
            above_before = (before & 0xFFFF) + above_total
            between_before = (before >> 16) + between_total
            take = above | (between & (between_before < quota))
            slot = above_before + tl.minimum(between_before, quota)
            tl.store(row_candidates + slot, (chunk_keys.to(tl.int64) << 32) | (0xFFFF - ids), mask=take)
            chunk_total = tl.sum(flags, axis=0)
            above_total += chunk_total & 0xFFFF
            between_total += chunk_total >> 16
        # Other threads of this program read the list: __syncthreads orders the global stores before
        # the loads, and .cg reads them from L2, past this SM's L1.
        tl.debug_barrier()

        slots = tl.arange(0, BLOCK_K)
        filled = slots < top_k
        candidates = tl.load(row_candidates + slots, mask=filled, other=-9223372036854775808,
                             cache_modifier=".cg")
        rank = tl.sum((candidates[None, :] > candidates[:, None]).to(tl.int32), axis=1)
        index = 0xFFFF - (candidates & 0xFFFF)
        candidate_logits = _key_float((candidates >> 32).to(tl.int32), KEY_SHIFT)

        seed = tl.load(seed_ptr + row * stride_seed)
        counter = tl.load(counter_ptr + row * stride_counter)
        # A tensor even where DRAW = 1 is compiled in as a constant.
        draw = tl.full((), 0, tl.int32) + DRAW
        noise = _exponential(_hash_bits(seed, counter, draw, rank.to(tl.uint32)), INTERPRETED)
        # The reference's x = logits / T and softmax's x - max(x), both correctly rounded; max(x) is
        # max(logits) / T since rounding is monotonic.
        max_scaled = tl.math.div_rn(_key_float(max_key, KEY_SHIFT), temperature)
        weight = _exp(tl.math.div_rn(candidate_logits, temperature) - max_scaled, INTERPRETED)
        race = tl.math.div_rn(weight, noise)
        # Races are >= 0, NaN, or -inf where the noise is -0.0 (see _exponential): the bits without the
        # sign order the non-negative ones, NaN above +inf (torch.argmax picks NaN); -inf goes below
        # every other race, and empty list entries below that.
        race_bits = race.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        race_key = tl.where(filled, tl.where(race < 0, -1, race_bits), -2)
        best = tl.max((race_key.to(tl.int64) << 32) | ((0xFFFF - rank.to(tl.int64)) << 16) | index, axis=0)
        token = (best & 0xFFFF).to(tl.int32)
    tl.store(out_ptr + row * stride_out, token.to(tl.int64))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, max_top_k: int,
                  seed: torch.Tensor, counter: torch.Tensor, draw: int, out: torch.Tensor | None = None,
                  tiles: SampleTiles | None = None) -> torch.Tensor:
    """Launcher; see the module doc. Returns out ([B] int64)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {list(logits.shape)}")
    batch, vocab = logits.shape
    if logits.dtype not in DTYPES:
        raise TypeError(f"logits must be float32 or bfloat16, got {logits.dtype}")
    if not 0 < vocab < MAX_VOCAB:
        raise ValueError(f"need 0 < V < {MAX_VOCAB}, got {vocab}")
    if max_top_k < 1:
        raise ValueError(f"max_top_k must be >= 1, got {max_top_k}")
    if not 0 <= draw < 2 ** 31:
        raise ValueError(f"draw must be in [0, 2**31), got {draw}")
    vectors = {"temperature": (temperature, (torch.float32,)),
               "top_k": (top_k, (torch.int64, torch.int32)),
               "seed": (seed, (torch.int64,)), "counter": (counter, (torch.int64,))}
    for name, (t, dtypes) in vectors.items():
        if t.shape != (batch,) or t.dtype not in dtypes:
            raise ValueError(f"{name} must be [{batch}] of {' or '.join(map(str, dtypes))}, "
                             f"got {list(t.shape)} {t.dtype}")
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if out.shape != (batch,) or out.dtype != torch.int64:
        raise ValueError(f"out must be [{batch}] int64, got {list(out.shape)} {out.dtype}")
    operands = (logits, temperature, top_k, seed, counter, out)
    check_launch_devices(*operands)
    if batch == 0:
        return out
    top_k_cap = min(max_top_k, vocab)
    block_k = next_pow2(top_k_cap, minimum=2)
    candidates = torch.empty(batch, block_k, dtype=torch.int64, device=logits.device)
    tiles = tiles or sample_tokens_tiles(vocab)
    if tiles.chunk < 2 or tiles.chunk & (tiles.chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 2, got {tiles.chunk}")
    use_pdl = pdl(logits.device, "sample_tokens")
    _sample_tokens_kernel[(batch,)](
        logits, temperature, top_k, seed, counter, candidates, out,
        vocab, top_k_cap, draw,
        logits.stride(0), logits.stride(1), temperature.stride(0), top_k.stride(0), seed.stride(0),
        counter.stride(0), candidates.stride(0), out.stride(0),
        KEY_SHIFT=16 if logits.dtype == torch.bfloat16 else 0, FLOAT_PASSES=FLOAT_PASSES,
        BLOCK_V=next_pow2(vocab, minimum=2), CHUNK=tiles.chunk, BLOCK_K=block_k, INTERPRETED=interpreting(),
        PDL=use_pdl, num_warps=tiles.num_warps, launch_pdl=use_pdl,
    )
    return out
