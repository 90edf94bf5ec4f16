"""sample_tokens kernel vs the reference sampler (moshi_fast.reference.sampling.sample): the same
tokens on tie-free random logits (text and audio shapes, fp32 and bf16, greedy and sampled slots,
per-slot top_k, seeds, counters and draws, strided and masked rows), the noise bit for bit, the
sampled distribution, never outside the top k even with tied logits; on a GPU, the real shapes and
CUDA-graph replays that advance the counter."""
import pytest
import torch
import triton
import triton.language as tl

from moshi_fast.kernels._utils import interpreting
from moshi_fast.kernels.sample_tokens import (SampleTiles, _exponential, _hash_bits, sample_tokens,
                                              sample_tokens_ref, sample_tokens_tiles)
from moshi_fast.reference import sampling

INT_VIEWS = {torch.float32: (torch.int32, 32), torch.bfloat16: (torch.int16, 16)}


def _ordered(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Float bits (as int64) <-> integers in float order; its own inverse."""
    return bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))


def tie_free_logits(temperature: torch.Tensor, vocab: int, max_top_k: int, dtype: torch.dtype,
                    scale: float = 2.0) -> torch.Tensor:
    """Random logits [B, vocab] in dtype (CPU) whose top min(max_top_k + 1, vocab) reference probabilities
    (float32 softmax(logits / temperature), temperature 1 for greedy slots) are pairwise distinct, so that
    torch.topk's set and order are unique. Equal top values are pushed apart by one step of the dtype,
    and rows whose probabilities still round together are drawn again."""
    batch = temperature.shape[0]
    keep = min(max_top_k + 1, vocab)
    int_dtype, width = INT_VIEWS[dtype]
    steps = torch.arange(keep)
    logits = torch.empty(batch, vocab, dtype=dtype)
    pending = torch.arange(batch)
    while len(pending):
        rows = (torch.randn(len(pending), vocab) * scale).to(dtype)
        values, order = rows.sort(-1, descending=True)
        keys = _ordered(values.view(int_dtype).long(), width)
        # Strictly decreasing top keys (each at most its own and one below the previous one), the rest
        # below them.
        top = torch.cummin(keys[:, :keep] + steps, -1).values - steps
        keys = torch.cat([top, torch.minimum(keys[:, keep:], top[:, -1:] - 1)], -1)
        rows.scatter_(-1, order, _ordered(keys, width).to(int_dtype).view(dtype))
        slot_temperature = temperature[pending]
        safe = torch.where(slot_temperature > 0, slot_temperature, torch.ones_like(slot_temperature))
        probs = torch.softmax(rows.float() / safe[:, None], -1).topk(keep, -1).values
        distinct = (probs[:, :-1] > probs[:, 1:]).all(-1)
        logits[pending[distinct]] = rows[distinct]
        pending = pending[~distinct]
    return logits


def slot_settings(batch: int, max_top_k: int):
    """(temperature, top_k, seed, counter) [B]: every fourth slot greedy (from slot 3), the others at
    temperatures in [0.3, 1.8); top_k 1, max_top_k or random in between; 64-bit seeds of both signs;
    counters past 2**32."""
    temperature = torch.rand(batch) * 1.5 + 0.3
    temperature[3::4] = 0.0
    top_k = torch.randint(1, max_top_k + 1, (batch,))
    top_k[1::5] = max_top_k
    top_k[2::9] = 1
    seed = torch.randint(-2 ** 62, 2 ** 62, (batch,))
    counter = torch.randint(0, 2 ** 40, (batch,))
    return temperature, top_k, seed, counter


def both(logits, temperature, top_k, max_top_k, seed, counter, draw, tiles=None):
    """(kernel tokens into a poisoned out, reference tokens)."""
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=logits.device)
    got = sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, draw, out=out, tiles=tiles)
    assert got is out
    return got, sample_tokens_ref(logits, temperature, top_k, max_top_k, seed, counter, draw)


@pytest.mark.parametrize("vocab, max_top_k, batch, draw, tiles", [
    pytest.param(2048, 250, 40, 8, None, id="audio"),
    pytest.param(3000, 25, 40, 0, None, id="text-narrow"),
    pytest.param(3000, 25, 16, 0, SampleTiles(4, 512), id="text-narrow-6-chunks"),
    pytest.param(32000, 25, 6, 0, None, id="text"),
    pytest.param(300, 300, 12, 1, None, id="top-k-is-vocab"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(vocab, max_top_k, batch, draw, tiles, dtype):
    temperature, top_k, seed, counter = slot_settings(batch, max_top_k)
    logits = tie_free_logits(temperature, vocab, max_top_k, dtype)
    got, expected = both(logits, temperature, top_k, max_top_k, seed, counter, draw, tiles)
    assert torch.equal(got, expected), (got != expected).nonzero().flatten().tolist()


@pytest.mark.filterwarnings("ignore:divide by zero")  # the interpreter's numpy sees the 1 / -0.0 on purpose
def test_negative_zero_noise_loses_the_race_as_in_the_reference():
    """Seed 23127, counter 0, draw 1 gives rank 223 the top uniform, which rounds to 1.0: noise -0.0
    and a race of -inf in the reference. Flat logits make that candidate the winner otherwise."""
    seed = torch.full((2,), 23127)
    counter = torch.zeros(2, dtype=torch.int64)
    noise = sampling.exponential_noise(seed, counter, 1, 250)
    assert noise[0, 223] == 0 and torch.signbit(noise[0, 223])
    logits = tie_free_logits(torch.ones(2), 2048, 250, torch.float32, scale=1e-3)
    temperature, top_k = torch.ones(2), torch.tensor([250, 224])
    got, expected = both(logits, temperature, top_k, 250, seed, counter, 1)
    assert torch.equal(got, expected)


def test_strided_logits_and_slot_vectors():
    batch, vocab, max_top_k = 8, 2048, 250
    temperature, top_k, seed, counter = slot_settings(batch, max_top_k)
    logits = tie_free_logits(temperature, vocab, max_top_k, torch.float32)
    wide = torch.randn(batch, vocab + 9)
    wide[:, 5:5 + vocab] = logits
    columns = logits.T.contiguous().T
    strided = tuple(t.repeat_interleave(step)[::step] for t, step in
                    ((temperature, 2), (top_k, 3), (seed, 2), (counter, 2)))
    expected = sample_tokens_ref(logits, temperature, top_k, max_top_k, seed, counter, 5)
    for view in (wide[:, 5:5 + vocab], columns):
        assert torch.equal(sample_tokens(view, *strided[:2], max_top_k, *strided[2:], 5), expected)


def test_masked_vocabulary():
    """-inf logits, down to fewer finite ones than top_k: -inf entries are then candidates of weight 0."""
    batch, vocab, max_top_k = 16, 512, 25
    temperature, top_k, seed, counter = slot_settings(batch, max_top_k)
    logits = tie_free_logits(temperature, vocab, max_top_k, torch.float32)
    finite = torch.rand(batch, vocab).argsort(-1) < torch.randint(1, 40, (batch, 1))
    logits = torch.where(finite, logits, float("-inf"))
    got, expected = both(logits, temperature, top_k, max_top_k, seed, counter, 2)
    assert torch.equal(got, expected)
    assert finite.gather(-1, got[:, None]).all()


def test_counter_seed_and_draw_select_the_noise():
    batch, vocab, max_top_k = 8, 2048, 250
    temperature = torch.ones(batch)
    top_k = torch.full((batch,), max_top_k)
    logits = tie_free_logits(temperature, vocab, max_top_k, torch.bfloat16, scale=0.5)
    seed, counter = torch.randint(0, 2 ** 62, (batch,)), torch.arange(batch)
    base = sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, 1)
    assert torch.equal(sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, 1), base)
    for changed in ((seed + 1, counter, 1), (seed, counter + 1, 1), (seed, counter, 2)):
        tokens = sample_tokens(logits, temperature, top_k, max_top_k, changed[0], changed[1], changed[2])
        assert torch.equal(tokens, sample_tokens_ref(logits, temperature, top_k, max_top_k, *changed))
        assert (tokens != base).sum() >= batch // 2


@triton.jit
def _noise_probe_kernel(seed_ptr, counter_ptr, draw, bits_ptr, noise_ptr, RANKS: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    """Row i: the kernel's hash bits and Exp(1) noise for ranks 0..RANKS-1 of (seed[i], counter[i], draw)."""
    row = tl.program_id(0)
    ranks = tl.arange(0, RANKS)
    bits = _hash_bits(tl.load(seed_ptr + row), tl.load(counter_ptr + row), tl.full((), 0, tl.int32) + draw,
                      ranks.to(tl.uint32))
    tl.store(bits_ptr + row * RANKS + ranks, bits.to(tl.int64))
    tl.store(noise_ptr + row * RANKS + ranks, _exponential(bits, INTERPRETED))


def kernel_noise(seed, counter, draw, ranks):
    bits = torch.empty(seed.shape[0], ranks, dtype=torch.int64, device=seed.device)
    noise = torch.empty(seed.shape[0], ranks, dtype=torch.float32, device=seed.device)
    _noise_probe_kernel[(seed.shape[0],)](seed, counter, draw, bits, noise, RANKS=ranks,
                                          INTERPRETED=interpreting())
    return bits, noise


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 ulps between positive floats."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


@pytest.mark.parametrize("draw", [0, 1, 9])
def test_noise_matches_the_reference(draw):
    seed = torch.tensor([0, 1, -1, 11, 11 + (1 << 32), -(1 << 62), (1 << 63) - 1])
    counter = torch.tensor([0, 1, 5, 5, 5, (1 << 32) + 3, (1 << 40) + 7])
    bits, noise = kernel_noise(seed, counter, draw, 256)
    h = sampling._combine(seed & sampling._MASK32, (seed >> 32) & sampling._MASK32)
    h = sampling._combine(sampling._combine(h, counter & sampling._MASK32), draw)
    assert torch.equal(bits, sampling._combine(h[:, None], torch.arange(256)[None, :]))
    # The uniforms are exact; torch's CPU log and numpy's (the interpreter's) differ by up to 4 ulp.
    assert ulps(noise, sampling.exponential_noise(seed, counter, draw, 256)) <= 4


def test_sampled_tokens_follow_topk_temperature_distribution():
    """Chi-square of the kernel's tokens against the top-k / temperature distribution; the same test
    rejects the reference run with one candidate too few, i.e. a kernel whose set is off by one."""
    vocab, top_k, temperature, draws = 40, 10, 0.8, 300
    # A flat top k: one candidate too few moves every count (the last by about 30).
    logits = (-0.03 * torch.arange(vocab, dtype=torch.float32))[torch.randperm(vocab)]
    args = (logits.expand(draws, -1), torch.full((draws,), temperature), torch.full((draws,), top_k), top_k,
            torch.full((draws,), 1234), torch.arange(draws), 0)
    top_probs, top_index = torch.softmax(logits / temperature, -1).topk(top_k)
    expected = draws * top_probs / top_probs.sum()

    def chi_square(tokens):
        counts = (tokens[:, None] == top_index[None, :]).sum(0).double()
        return int(counts.sum()), float(((counts - expected) ** 2 / expected).sum())

    # 99.9% quantile of chi-square with top_k - 1 = 9 degrees of freedom.
    threshold = 27.88
    inside, statistic = chi_square(sample_tokens(*args))
    assert inside == draws, "a token outside the top k was sampled"
    assert statistic < threshold, statistic
    off_by_one = list(args)
    off_by_one[2] = torch.full((draws,), top_k - 1)
    assert chi_square(sample_tokens_ref(*off_by_one))[1] > threshold


def test_never_outside_top_k_with_tied_logits():
    """Integer logits tie everywhere (torch.topk's order among ties is unspecified, so no reference
    token to match): tokens stay in the top k by value, and greedy takes the first maximum."""
    logits = torch.randint(0, 6, (6, 300)).float()
    top_k = torch.tensor([1, 2, 5, 25, 50, 250])
    temperature = torch.tensor([1.5, 1.5, 1.5, 1.5, 1.5, 0.0])
    kth_value = torch.stack([row.topk(int(k)).values[-1] for row, k in zip(logits, top_k)])
    for counter in range(4):
        tokens = sample_tokens(logits.bfloat16(), temperature, top_k, 250, torch.full((6,), 99),
                               torch.full((6,), counter), 0)
        assert (logits.gather(-1, tokens[:, None])[:, 0] >= kth_value).all()
        assert tokens[5] == logits[5].argmax()
    # Ties at the k-th value fill the set in vocabulary order after every larger logit, wherever it
    # is: all-equal logits give the first k ids, and ties ahead of a far larger logit (id 63) must
    # not crowd it out, in one compaction chunk or across several.
    flat, spike = torch.zeros(1, 64), torch.zeros(1, 64)
    spike[0, 63] = 100.0
    for counter in range(3):
        args = (torch.ones(1), torch.tensor([5]), 5, torch.tensor([3]), torch.tensor([counter]), 0)
        for tiles in (None, SampleTiles(4, 16)):
            assert sample_tokens(flat, *args, tiles=tiles) < 5
            assert sample_tokens(spike, *args, tiles=tiles) == 63


def test_argument_checks():
    logits = torch.randn(2, 16)
    vectors = (torch.ones(2), torch.full((2,), 4), torch.zeros(2, dtype=torch.long),
               torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError):
        sample_tokens(logits.half(), *vectors[:2], 4, *vectors[2:], 0)
    with pytest.raises(ValueError):
        one = [v[:1] for v in vectors]
        sample_tokens(torch.randn(1, 1 << 16), *one[:2], 4, *one[2:], 0)
    with pytest.raises(ValueError):
        sample_tokens(logits, vectors[0], vectors[1], 4, vectors[2].int(), vectors[3], 0)
    with pytest.raises(ValueError):
        sample_tokens(logits, *vectors[:2], 4, *vectors[2:], 0, out=torch.empty(2, dtype=torch.int32))
    with pytest.raises(ValueError):
        sample_tokens(logits, *vectors[:2], 4, *vectors[2:], 0, tiles=SampleTiles(4, 24))
    assert sample_tokens_tiles(2048) == SampleTiles(4, 2048)
    assert sample_tokens_tiles(32000) == SampleTiles(16, 8192)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab, max_top_k, draw", [(32000, 25, 0), (2048, 250, 1), (2048, 250, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_real_shapes_on_gpu(vocab, max_top_k, draw, dtype):
    for batch in (1, 8, 64):
        temperature, top_k, seed, counter = slot_settings(batch, max_top_k)
        logits = tie_free_logits(temperature, vocab, max_top_k, dtype)
        got, expected = both(*(t.cuda() for t in (logits, temperature, top_k)), max_top_k, seed.cuda(),
                             counter.cuda(), draw)
        assert torch.equal(got, expected)


@triton.jit
def _exponential_probe_kernel(bits_ptr, noise_ptr, BLOCK: tl.constexpr):
    """The kernel's Exp(1) noise (on the GPU) for given hash bits."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(noise_ptr + offs, _exponential(tl.load(bits_ptr + offs).to(tl.uint32, bitcast=True), False))


@pytest.mark.gpu
def test_noise_on_gpu_is_torch_bit_for_bit():
    """libdevice's logf against torch's CUDA log, over every uniform the noise can take."""
    _, noise = kernel_noise(torch.arange(64, device="cuda") * 7919, torch.arange(64, device="cuda"), 3, 256)
    assert ulps(noise, sampling.exponential_noise(torch.arange(64, device="cuda") * 7919,
                                                  torch.arange(64, device="cuda"), 3, 256)) == 0
    every = torch.arange(1 << 24, device="cuda")
    noise = torch.empty(1 << 24, device="cuda")
    _exponential_probe_kernel[((1 << 24) // 1024,)]((every << 8).to(torch.int32), noise, BLOCK=1024)
    uniform = (every.float() + 0.5) * (1.0 / (1 << 24))
    assert ulps(noise, -torch.log(uniform)) == 0


def assert_graph_replays_draw_fresh_noise(sampler) -> None:
    """sampler (sample_tokens's signature) captured in a CUDA graph: replays repeat the reference's tokens
    until the counter advances, then draw the reference's new ones."""
    batch, vocab, max_top_k = 64, 2048, 250
    temperature, top_k = torch.ones(batch), torch.full((batch,), max_top_k)
    logits = tie_free_logits(temperature, vocab, max_top_k, torch.bfloat16, scale=0.5).cuda()
    temperature, top_k = temperature.cuda(), top_k.cuda()
    seed = torch.randint(0, 2 ** 62, (batch,), device="cuda")
    counter = torch.zeros(batch, dtype=torch.int64, device="cuda")
    out = torch.empty(batch, dtype=torch.int64, device="cuda")
    args = (logits, temperature, top_k, max_top_k, seed, counter, 4)
    sampler(*args, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampler(*args, out=out)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.equal(out, first)
    assert torch.equal(first, sample_tokens_ref(*args))
    counter += 1
    graph.replay()
    assert torch.equal(out, sample_tokens_ref(*args))
    assert (out != first).sum() >= batch // 2


@pytest.mark.gpu
def test_cuda_graph_replay_draws_fresh_noise_when_the_counter_advances():
    assert_graph_replays_draw_fresh_noise(sample_tokens)
