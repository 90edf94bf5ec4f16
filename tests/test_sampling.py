"""Sampling: greedy is argmax; sampled tokens follow the top-k / temperature distribution; never
outside the top k; the counter-based noise is deterministic per (seed, counter, draw)."""
import math

import torch

from moshi_fast.reference import sampling


def _sample(logits, temperature, top_k, max_top_k, seed, counter, draw=0):
    batch = logits.shape[0]
    as_tensor = lambda v, dtype: v if isinstance(v, torch.Tensor) else torch.full((batch,), v, dtype=dtype)  # noqa: E731
    return sampling.sample(logits, as_tensor(temperature, torch.float32), as_tensor(top_k, torch.long), max_top_k,
                           as_tensor(seed, torch.long), as_tensor(counter, torch.long), draw)


def test_greedy_is_argmax():
    logits = torch.randn(37, 501)
    assert torch.equal(_sample(logits, 0.0, 25, 25, 3, 0), logits.argmax(-1))


def test_sampled_tokens_follow_topk_temperature_distribution():
    vocab, top_k, temperature, draws = 40, 10, 0.7, 20000
    logits = torch.randn(vocab) * 2
    tokens = _sample(logits.expand(draws, -1), temperature, top_k, top_k, 1234, torch.arange(draws))
    probs = torch.softmax(logits / temperature, -1)
    top_probs, top_index = probs.topk(top_k)
    expected = draws * top_probs / top_probs.sum()
    counts = torch.stack([(tokens == i).sum() for i in top_index]).double()
    assert int(counts.sum()) == draws, "a token outside the top k was sampled"
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 99.9% quantile of chi-square with top_k - 1 = 9 degrees of freedom.
    assert chi_square < 27.88, (chi_square, counts.tolist(), expected.tolist())


def test_never_outside_top_k_per_slot():
    logits = torch.randn(6, 300)
    top_k = torch.tensor([1, 2, 5, 25, 50, 250])
    for counter in range(40):
        tokens = _sample(logits, 1.5, top_k, 250, 99, counter)
        for row in range(6):
            allowed = logits[row].topk(int(top_k[row])).indices
            assert tokens[row] in allowed
    assert torch.equal(_sample(logits[:1], 1.5, 1, 250, 5, 0), logits[:1].argmax(-1))


def test_per_slot_temperature_zero_is_greedy():
    logits = torch.randn(4, 100)
    temperature = torch.tensor([0.0, 1.0, 0.0, 1.0])
    tokens = _sample(logits, temperature, 100, 100, 7, 3)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_noise_is_exponential_and_keyed():
    noise = sampling.exponential_noise(torch.tensor([11]), torch.tensor([5]), 2, 200000)[0].double()
    assert abs(float(noise.mean()) - 1) < 0.01 and abs(float(noise.var()) - 1) < 0.02
    for q in (0.1, 0.5, 0.9, 0.99):
        assert abs(float((noise < -math.log(1 - q)).double().mean()) - q) < 0.005
    key = lambda seed, counter, draw: sampling.exponential_noise(  # noqa: E731
        torch.tensor([seed]), torch.tensor([counter]), draw, 64)
    assert torch.equal(key(11, 5, 2), key(11, 5, 2))
    for other in (key(12, 5, 2), key(11, 6, 2), key(11, 5, 3), key(11 + (1 << 32), 5, 2)):
        assert not torch.equal(key(11, 5, 2), other)


def test_slot_sample_does_not_depend_on_batch():
    logits = torch.randn(3, 2048)
    alone = _sample(logits[1:2], 0.8, 250, 250, torch.tensor([42]), torch.tensor([9]))
    batched = _sample(logits, 0.8, 250, 250, torch.tensor([1, 42, 3]), torch.tensor([0, 9, 4]))
    assert alone[0] == batched[1]
