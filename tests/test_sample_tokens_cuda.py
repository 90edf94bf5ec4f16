"""The CUDA extension's sampling kernel (csrc/sample_tokens_kernel.cuh, `cuda_ext.sample_tokens`) on the GPU: the
Triton kernel's tokens and the reference sampler's on tie-free random logits (every vocabulary range of its
launch plans, fp32 and bf16, greedy and sampled slots, per-slot top_k), the Triton kernel's tokens where logits
tie or are -inf, the -0.0 noise rule, strided operands, CUDA-graph replays, argument checks, and ops'
dispatch to it for bf16 logits (the default, `ops.cuda_sampling`). On the CPU: that switch (on by default), and
that ops.sample_tokens keeps the Triton kernel and the reference there."""
import os
import subprocess
import sys

import pytest
import torch

from moshi_fast import cuda_ext, ops
from moshi_fast.kernels.sample_tokens import sample_tokens as triton_sample_tokens
from moshi_fast.kernels.sample_tokens import sample_tokens_ref
from moshi_fast.reference import sampling

from .test_sample_tokens import assert_graph_replays_draw_fresh_noise, slot_settings, tie_free_logits


@pytest.fixture(scope="module")
def extension():
    """The extension on the GPU machine, where its tests fail, rather than skip, when it cannot load."""
    assert cuda_ext.available(), cuda_ext.unavailable_reason()


def cuda_operands(*tensors):
    return tuple(t.cuda() for t in tensors)


TRITON_MAX_TOP_K = 256
"""Beyond this the Triton kernel's [k, k] rank comparison is too large to be worth compiling for a test."""


KERNEL_PATHS = {
    "plain": {},
    "vector-loads": {"vector_loads": True},
    "warp-kernel": {"warp_kernel": True},
    "warp-kernel-vector-loads": {"warp_kernel": True, "vector_loads": True},
    "radix": {"radix_select": True},
    "warp-kernel-vector-loads-radix": {"warp_kernel": True, "vector_loads": True, "radix_select": True},
}
"""cuda_ext.sample_tokens's paths, by its switches (the warp kernel only where it applies: bf16 text-sized rows; the
radix select in the block-wide kernel, every other row; ops runs the last one), each tested against the Triton
kernel and the reference."""


def three_ways(logits, temperature, top_k, max_top_k, seed, counter, draw, **paths):
    """(CUDA tokens into a poisoned out, Triton tokens (the reference's past TRITON_MAX_TOP_K), reference
    tokens); paths: cuda_ext.sample_tokens's switches."""
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=logits.device)
    got = cuda_ext.sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, draw, out=out, **paths)
    assert got is out
    args = (logits, temperature, top_k, max_top_k, seed, counter, draw)
    expected = sample_tokens_ref(*args)
    return got, triton_sample_tokens(*args) if max_top_k <= TRITON_MAX_TOP_K else expected, expected


@pytest.mark.gpu
@pytest.mark.parametrize("vocab, max_top_k, batch, draw", [
    pytest.param(2048, 250, 64, 3, id="audio"),
    pytest.param(32000, 25, 16, 0, id="text"),
    pytest.param(9000, 32, 8, 0, id="small-k-widest-list"),
    pytest.param(32768, 7, 4, 0, id="small-k-fullest-block"),
    pytest.param(3000, 25, 40, 0, id="narrow-text"),
    pytest.param(7000, 120, 16, 2, id="8192-plan"),
    pytest.param(12000, 60, 8, 1, id="16384-plan"),
    pytest.param(40000, 25, 4, 0, id="65535-plan"),
    pytest.param(300, 300, 12, 1, id="top-k-is-vocab"),
    pytest.param(1500, 1024, 8, 5, id="largest-candidate-list"),
    pytest.param(17, 5, 9, 7, id="tiny"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("paths", list(KERNEL_PATHS))
def test_matches_triton_kernel_and_reference(extension, vocab, max_top_k, batch, draw, dtype, paths):
    temperature, top_k, seed, counter = slot_settings(batch, max_top_k)
    logits = tie_free_logits(temperature, vocab, max_top_k, dtype)
    got, triton_tokens, expected = three_ways(*cuda_operands(logits, temperature, top_k), max_top_k,
                                              *cuda_operands(seed, counter), draw, **KERNEL_PATHS[paths])
    assert torch.equal(got, triton_tokens), (got != triton_tokens).nonzero().flatten().tolist()
    assert torch.equal(got, expected), (got != expected).nonzero().flatten().tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab, max_top_k", [(2048, 250), (32000, 25)], ids=["audio", "text"])
@pytest.mark.parametrize("paths", list(KERNEL_PATHS))
def test_ties_and_masked_rows_match_the_triton_kernel(extension, dtype, vocab, max_top_k, paths):
    """Integer logits tie everywhere (the k-th value's ties are taken in vocabulary order by both kernels);
    -inf logits, down to fewer finite ones than top_k; all-equal rows; a spike behind a run of ties. With the warp
    kernel, the text shape in bf16 runs the warp-reduction kernel."""
    batch = 48
    temperature, top_k, seed, counter = slot_settings(batch, max_top_k)
    tied = torch.randint(0, 6, (batch, vocab)).float()
    masked = torch.where(torch.rand(batch, vocab).argsort(-1) < torch.randint(1, 300, (batch, 1)),
                         torch.randn(batch, vocab), float("-inf"))
    flat = torch.zeros(batch, vocab)
    spike = torch.zeros(batch, vocab)
    spike[:, -1] = 100.0
    for logits in (tied, masked, flat, spike):
        args = (*cuda_operands(logits.to(dtype), temperature, top_k), max_top_k, *cuda_operands(seed, counter), 4)
        got = cuda_ext.sample_tokens(*args, **KERNEL_PATHS[paths])
        assert torch.equal(got, triton_sample_tokens(*args))
    assert (cuda_ext.sample_tokens(*args, **KERNEL_PATHS[paths]) == vocab - 1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("radix_select", [False, True], ids=["bisection", "radix"])
def test_more_than_two_to_the_fifteen_ties_before_a_spike(extension, radix_select):
    """The block-wide scan of the compaction counts ties in the high 16 bits of a packed word: 40000 tied
    entries ahead of a spike must neither turn that count negative nor push the spike out of the list."""
    flat = torch.zeros(4, 40000, device="cuda")
    spike = flat.clone()
    spike[:, -1] = 100.0
    args = (torch.ones(4, device="cuda"), torch.tensor([5, 5, 25, 2], device="cuda"), 25,
            torch.arange(4, device="cuda"), torch.zeros(4, dtype=torch.int64, device="cuda"), 0)
    assert (cuda_ext.sample_tokens(flat, *args, radix_select=radix_select) < args[1]).all()
    assert (cuda_ext.sample_tokens(spike, *args, radix_select=radix_select) == 39999).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_radix_select_splits_keys_that_share_their_high_bits(extension, dtype):
    """Logits 1 + i machine epsilons (i < V, shuffled). In fp32 they lie in one binade and share their top 21 bits:
    the first two passes choose the same bin for every key, and the k-th key is found by the last two. In bf16 they
    run from 1 to 17, rounded: three first-pass bins, and up to 16 logits on one value, so the k-th key is tied.
    Negative rows too (their keys order the other way). Against the Triton kernel, whose keys are the same (the
    reference ranks float32 probabilities, which one unit apart may round together)."""
    batch, vocab, max_top_k = 6, 2048, 250
    temperature, top_k, seed, counter = slot_settings(batch, max_top_k)
    unit = torch.finfo(dtype).eps
    steps = torch.stack([torch.randperm(vocab) for _ in range(batch)]).to(torch.float64)
    logits = (1.0 + steps * unit).to(dtype)
    logits[batch // 2:] = -logits[batch // 2:]
    got, triton_tokens, _ = three_ways(*cuda_operands(logits, temperature, top_k), max_top_k,
                                       *cuda_operands(seed, counter), 3, radix_select=True)
    assert torch.equal(got, triton_tokens), (got != triton_tokens).nonzero().flatten().tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("radix_select", [False, True], ids=["bisection", "radix"])
def test_negative_zero_noise_loses_the_race_as_in_the_reference(extension, radix_select):
    """Seed 23127, counter 0, draw 1 gives rank 223 the noise -0.0 (tests/test_sample_tokens.py)."""
    seed, counter = torch.full((2,), 23127), torch.zeros(2, dtype=torch.int64)
    assert torch.signbit(sampling.exponential_noise(seed, counter, 1, 250)[0, 223])
    logits = tie_free_logits(torch.ones(2), 2048, 250, torch.float32, scale=1e-3)
    got, triton_tokens, expected = three_ways(*cuda_operands(logits, torch.ones(2), torch.tensor([250, 224])), 250,
                                              *cuda_operands(seed, counter), 1, radix_select=radix_select)
    assert torch.equal(got, expected) and torch.equal(got, triton_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("radix_select", [False, True], ids=["bisection", "radix"])
@pytest.mark.parametrize("vector_loads", [False, True], ids=["default", "vector-loads-fall-back"])
def test_strided_logits_and_slot_vectors(extension, vector_loads, radix_select):
    """Rows that start off 16-byte alignment and columns that are not contiguous: element loads either way."""
    batch, vocab, max_top_k = 8, 2048, 250
    temperature, top_k, seed, counter = cuda_operands(*slot_settings(batch, max_top_k))
    logits = tie_free_logits(temperature.cpu(), vocab, max_top_k, torch.bfloat16).cuda()
    wide = torch.randn(batch, vocab + 9, device="cuda").bfloat16()
    wide[:, 5:5 + vocab] = logits
    columns = logits.T.contiguous().T
    strided = tuple(t.repeat_interleave(step)[::step] for t, step in
                    ((temperature, 2), (top_k, 3), (seed, 2), (counter, 2)))
    expected = sample_tokens_ref(logits, temperature, top_k, max_top_k, seed, counter, 5)
    out = torch.zeros(2 * batch, dtype=torch.int64, device="cuda")
    for view in (wide[:, 5:5 + vocab], columns):
        cuda_ext.sample_tokens(view, *strided[:2], max_top_k, *strided[2:], 5, out=out[::2],
                               vector_loads=vector_loads, radix_select=radix_select)
        assert torch.equal(out[::2], expected)
        assert (out[1::2] == 0).all()


@pytest.mark.gpu
def test_cuda_graph_replay_draws_fresh_noise_when_the_counter_advances(extension):
    assert_graph_replays_draw_fresh_noise(cuda_ext.sample_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("change, error", [
    (lambda a: {**a, "logits": a["logits"].half()}, TypeError),
    (lambda a: {**a, "logits": a["logits"][0]}, ValueError),
    (lambda a: {**a, "logits": torch.zeros(2, 1 << 16, device="cuda")}, ValueError),
    (lambda a: {**a, "max_top_k": 0}, ValueError),
    (lambda a: {**a, "max_top_k": 1025}, ValueError),
    (lambda a: {**a, "draw": -1}, ValueError),
    (lambda a: {**a, "temperature": a["temperature"].double()}, TypeError),
    (lambda a: {**a, "top_k": a["top_k"].int()}, TypeError),
    (lambda a: {**a, "seed": a["seed"][:1]}, ValueError),
    (lambda a: {**a, "counter": a["counter"].cpu()}, ValueError),
    (lambda a: {**a, "out": torch.empty(2, dtype=torch.int32, device="cuda")}, TypeError),
])
def test_bad_arguments_raise(extension, change, error):
    args = {"logits": torch.randn(2, 2048, device="cuda"), "temperature": torch.ones(2, device="cuda"),
            "top_k": torch.full((2,), 250, device="cuda"), "max_top_k": 250,
            "seed": torch.zeros(2, dtype=torch.int64, device="cuda"),
            "counter": torch.zeros(2, dtype=torch.int64, device="cuda"), "draw": 1,
            "out": torch.empty(2, dtype=torch.int64, device="cuda")}
    with pytest.raises(error):
        cuda_ext.sample_tokens(**change(args))


@pytest.mark.gpu
def test_ops_dispatches_bf16_logits_to_the_extension_by_default(extension, monkeypatch):
    calls = []
    original = cuda_ext.sample_tokens
    monkeypatch.setattr(cuda_ext, "sample_tokens", lambda *a, **k: calls.append(
        (a[0].shape, k["warp_kernel"], k["vector_loads"], k["radix_select"])) or original(*a, **k))
    temperature, top_k, seed, counter = cuda_operands(*slot_settings(4, 250))
    logits = torch.randn(4, 2048, device="cuda").bfloat16()
    expected = sample_tokens_ref(logits, temperature, top_k, 250, seed, counter, 1)
    with ops.cuda_sampling(False):
        assert torch.equal(ops.sample_tokens(logits, temperature, top_k, 250, seed, counter, 1), expected)
    assert calls == []
    assert ops._cuda_sampling
    assert torch.equal(ops.sample_tokens(logits, temperature, top_k, 250, seed, counter, 1), expected)
    # The warp kernel where it applies, 16-byte loads, the radix select.
    assert calls == [(logits.shape, True, True, True)]
    # int32 top_k, and fp32 logits (where the Triton kernel measured as fast), are the Triton kernel's.
    assert torch.equal(ops.sample_tokens(logits, temperature, top_k.int(), 250, seed, counter, 1), expected)
    assert torch.equal(ops.sample_tokens(logits.float(), temperature, top_k, 250, seed, counter, 1), expected)
    assert len(calls) == 1


def test_cuda_sampling_is_on_by_default_and_scoped(monkeypatch):
    monkeypatch.delenv(ops.CUDA_SAMPLING_ENV, raising=False)
    code = "import moshi_fast.ops as ops; assert ops._cuda_sampling"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ}).returncode == 0
    code = "import moshi_fast.ops as ops; assert not ops._cuda_sampling"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, ops.CUDA_SAMPLING_ENV: "0"}).returncode == 0
    saved = ops._cuda_sampling
    with ops.cuda_sampling(True):
        assert ops._cuda_sampling
        with ops.cuda_sampling(False):
            assert not ops._cuda_sampling
        assert ops._cuda_sampling
    assert ops._cuda_sampling == saved


def test_ops_keeps_the_triton_kernel_and_reference_off_the_extension():
    temperature, top_k, seed, counter = slot_settings(3, 25)
    logits = tie_free_logits(temperature, 300, 25, torch.float32)
    assert not cuda_ext.sample_tokens_supported(logits, temperature, top_k, 25, seed, counter, None)
    expected = sample_tokens_ref(logits, temperature, top_k, 25, seed, counter, 0)
    with ops.cuda_sampling(True):
        assert torch.equal(ops.sample_tokens(logits, temperature, top_k, 25, seed, counter, 0), expected)
