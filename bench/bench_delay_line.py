"""delay_line_in and delay_line_out on Moshi's delay line (17 streams: text, Moshi's 8 audio codebooks,
the user's 8; moshiko's delays; LMCache's span of max_delay + 2 = 3 frames) beside the torch path (their
references: the torch ops the LM step ran before the kernels, 10 launches before Helium and 14 after the
depth transformer; delay_line_out_ref launches one more, a reduction for max(delays), which the step took
from the config). Both called as the LM step calls them, outputs allocated (from the graph's pool, nothing
at replay); every slot running."""
import pytest
import torch

from moshi_fast.config import moshiko
from moshi_fast.kernels.delay_line import delay_line_in, delay_line_in_ref, delay_line_out, delay_line_out_ref

GPU = torch.cuda.is_available()
LM = moshiko().lm
STREAMS, USER_STREAMS, OWN_STREAMS, SPAN = LM.num_streams, LM.n_q - LM.dep_q, 1 + LM.dep_q, LM.max_delay + 2
TOKEN_BYTES = 8


@pytest.mark.parametrize("batch", [1, 8, 64] if GPU else [3])
@pytest.mark.parametrize("half", ["in", "out"])
def test_delay_line(measure, device, half, batch):
    delays = torch.tensor(LM.delays, device=device)
    line = torch.randint(0, LM.card, (batch, STREAMS, SPAN), device=device)
    # Past max_delay, so that every output token is read from the line.
    frame = torch.randint(LM.max_delay + 1, 1000, (batch,), device=device)
    mask = torch.ones(batch, dtype=torch.bool, device=device)
    if half == "in":
        initial = torch.tensor([LM.text_initial_token] + [LM.audio_initial_token] * LM.n_q, device=device)
        order = torch.tensor([*range(1, STREAMS), 0], device=device)
        codes = torch.randint(0, LM.card, (batch, USER_STREAMS), device=device)
        operands = (line, frame, mask, codes, delays, initial, order)
        fast, torch_fn = delay_line_in, delay_line_in_ref
        # Per slot: the frame and flag, the line's tokens read, the codes read and written, the tokens
        # written; the delays, initial tokens and order once.
        moved = (batch * (TOKEN_BYTES + 1 + TOKEN_BYTES * (2 * STREAMS + 2 * USER_STREAMS))
                 + 3 * TOKEN_BYTES * STREAMS)
    else:
        generated = torch.randint(0, LM.card, (OWN_STREAMS, batch), device=device).t()
        operands = (line, frame, mask, generated, delays)
        fast, torch_fn = delay_line_out, delay_line_out_ref
        # Per slot: the frame read and written, the flag read, valid written, the generated tokens read,
        # stored and the delayed ones read and written out; the delays once.
        moved = batch * (2 * TOKEN_BYTES + 2 + 4 * TOKEN_BYTES * OWN_STREAMS) + TOKEN_BYTES * STREAMS

    measure(lambda: fast(*operands), moved, lambda: torch_fn(*operands), op=f"delay_line_{half}", batch=batch,
            streams=STREAMS, span=SPAN)
