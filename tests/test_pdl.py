"""Programmatic dependent launch (kernels/_utils.pdl): where it is on, and that it changes no result.

With PDL a kernel's programs may start while the previous kernel still runs; each kernel waits for it
before touching anything that kernel writes. A kernel that read or wrote too early would make the frame
depend on timing: the GPU tests run the whole frame at Moshi's real shapes captured both ways and require
bitwise equal outputs, frame after frame.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moshi_fast import ops
from moshi_fast.kernels._utils import pdl, programmatic_launch


def test_pdl_is_off_on_the_cpu():
    assert not pdl(torch.device("cpu"))
    with programmatic_launch(True):
        assert not pdl(torch.device("cpu"))


def test_programmatic_launch_restores_the_setting_after_an_error():
    from moshi_fast.kernels import _utils

    before = _utils._pdl_allowed
    with pytest.raises(RuntimeError, match="inside"):
        with ops.programmatic_launch(not before):
            assert _utils._pdl_allowed is (not before)
            raise RuntimeError("inside")
    assert _utils._pdl_allowed is before


def test_pdl_policy_by_kernel_size_and_device(monkeypatch):
    """The launch policy without a GPU: a CUDA device object, its compute capability faked, outside the
    interpreter."""
    from moshi_fast.kernels import _utils

    cuda = torch.device("cuda", 0)
    capability = {"value": (9, 0)}
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    monkeypatch.setattr(_utils, "_compute_capability", lambda device: capability["value"])
    monkeypatch.setattr(_utils, "PDL_KERNELS", {"linear", "sample_tokens"})
    monkeypatch.setattr(_utils, "PDL_MAX_STREAM_BYTES", 1000)
    assert pdl(cuda) and pdl(cuda, "linear", 1000) and pdl(cuda, "sample_tokens")
    assert not pdl(cuda, "linear", 1001)
    assert not pdl(cuda, "paged_attention")
    with programmatic_launch(False):
        assert not pdl(cuda, "linear")
    capability["value"] = (8, 0)
    assert not pdl(cuda, "linear")


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="programmatic dependent launch needs a GPU of compute capability >= 9.0")
@pytest.mark.parametrize("batch", [1, 4])
def test_frame_graph_is_bitwise_equal_with_and_without_programmatic_launch(batch):
    """Moshi's real shapes (bf16 LM, fp32 Mimi, context 400), sampling on: the frame graph captured with
    PDL and the one captured without it give the same pcm, tokens, user codes and logits, bit for bit,
    over 40 frames of speech-like audio with the KV window filling up."""
    from moshi_fast import FastMoshi
    from moshi_fast.config import moshiko
    from moshi_fast.fast.moshi import FastFrameRunner
    from moshi_fast.reference.lm import SamplingParams

    from .helpers import speech_like

    device = torch.device("cuda")
    assert pdl(device)
    config = dataclasses.replace(moshiko(), lm=dataclasses.replace(moshiko().lm, context=400))
    engine = FastMoshi.random(config, device=device, backend="fast", dtype=torch.bfloat16)

    def sampling():
        full = lambda value, dtype: torch.full((batch,), value, dtype=dtype, device=device)  # noqa: E731
        return SamplingParams(full(0.7, torch.float32), full(25, torch.long), full(0.8, torch.float32),
                              full(250, torch.long), torch.arange(batch, device=device) + 11, 25, 250)

    with_pdl = FastFrameRunner(engine.mimi, engine.lm, batch, sampling(), device, buckets=[batch])
    with programmatic_launch(False):
        without_pdl = FastFrameRunner(engine.mimi, engine.lm, batch, sampling(), device, buckets=[batch])
    mask = torch.ones(batch, dtype=torch.bool, device=device)
    pcm = speech_like(batch, 40, seed=batch).to(device).split(config.mimi.frame_size, dim=-1)
    produced = 0
    with torch.no_grad():
        for t, frame in enumerate(pcm):
            ours = [tensor.clone() for tensor in with_pdl.step(frame, mask)]
            theirs = without_pdl.step(frame, mask)
            for name, a, b in zip(theirs._fields, ours, theirs):
                assert torch.equal(a, b), (t, name)
            produced += int(theirs.valid.sum())
    assert produced > 0
