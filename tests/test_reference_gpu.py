"""The reference on the GPU: same results as on the CPU (float32), bf16 within its precision,
and the whole real-size model running."""
import copy

import pytest
import torch

from moshi_fast import FastMoshi, MimiCodec, moshiko, tiny
from moshi_fast.reference.lm import LM
from moshi_fast.weights import random_init_

from .helpers import rel_err, speech_like

pytestmark = pytest.mark.gpu


def test_mimi_on_gpu_matches_cpu(no_tf32):
    cpu = MimiCodec.random(moshiko().mimi, device="cpu", seed=3)
    gpu = MimiCodec(copy.deepcopy(cpu.model).to("cuda"), torch.device("cuda"))
    pcm = speech_like(2, 12)
    codes = cpu.encode(pcm)
    agreement = float((gpu.encode(pcm.cuda()).cpu() == codes).float().mean())
    error = rel_err(gpu.decode(codes.cuda()).cpu(), cpu.decode(codes))
    print(f"\nreference Mimi GPU vs CPU (fp32, no TF32): codes equal {agreement:.4%}, decode rel err {error:.2e}")
    assert agreement >= 0.999 and error <= 1e-5


def test_lm_bf16_on_gpu_is_close_to_fp32():
    with torch.device("cuda"):
        lm32 = random_init_(LM(tiny().lm), seed=4).eval()
    lm16 = LM(tiny().lm).to("cuda", torch.bfloat16).eval()
    lm16.load_state_dict({k: v.to(torch.bfloat16) for k, v in lm32.state_dict().items()})
    config = lm32.config
    tokens = torch.randint(0, config.card, (2, config.num_streams, 30), device="cuda")
    tokens[:, 0] = torch.randint(0, config.text_card, (2, 30), device="cuda")
    with torch.no_grad():
        _, logits32 = lm32.forward_text(tokens)
        _, logits16 = lm16.forward_text(tokens)
    error = rel_err(logits16.float(), logits32)
    print(f"\nreference LM bf16 vs fp32 on GPU: text logits rel err {error:.2e}")
    assert error <= 2e-2


def test_real_size_model_steps_on_gpu():
    engine = FastMoshi.random(moshiko(), device="cuda", max_batch=2, seed=1)
    frames = [f[:, 0] for f in speech_like(2, 4).split(1920, dim=-1)]
    outputs = [engine.step(frame.cuda()) for frame in frames]
    assert outputs[0].text_tokens.tolist() == [-1, -1]
    for out in outputs[1:]:
        assert out.pcm.shape == (2, 1920) and bool(torch.isfinite(out.pcm).all())
        assert all(0 <= t < 32000 for t in out.text_tokens.tolist())
        assert bool(((out.audio_codes >= 0) & (out.audio_codes < 2048)).all())
    print(f"\nreal-size reference model on {torch.cuda.get_device_name()}: "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak for 2 conversations")
