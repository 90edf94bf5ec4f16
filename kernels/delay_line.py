"""Kyutai LMGen's delay-line bookkeeping around one LM step, each half in one launch: before Helium the
user's codes enter the line and the frame's input tokens are read (`delay_line_in`); after the depth
transformer the generated tokens enter the line, the delayed output is read and the frame counter
advances (`delay_line_out`).

Shapes (the line is LMCache.tokens; at Moshi's config S = 17 streams, T = max_delay + 2 = 3):
    line        [B, S, T]  int64, any strides: stream s's token of frame t at line[b, s, t mod T]
    frame       [B]        int64, any stride: each slot's frame index
    exec_mask   [B]        bool, any stride: the slots that run this frame
    delays      [S]        int64, any stride: stream s's delay in frames
  delay_line_in:
    user_codes  [B, U]     int64, any strides: this frame's codes of the user, for the line's last U streams
    initial     [S]        int64, any stride: stream s's token until its delay has passed
    order       [S]        int64, any stride: out's column i holds stream order[i] (Helium's embedding
                           order: the audio streams, then text)
    out         [B, S]     int64, any strides
  delay_line_out:
    generated   [B, G]     int64, any strides: this frame's tokens of the line's first G streams (text and
                           Moshi's audio codebooks)
    out         [B, G]     int64, any strides: the delayed output tokens
    valid_out   [B]        bool, any stride

Semantics (a mod T as torch's `%` gives it, in [0, T) for negative a too; M = max(delays)):
  delay_line_in, for each slot b, f = frame[b]:
    where exec_mask[b], line[b, s, (f + delays[s]) mod T] = user_codes[b, s - (S - U)] for s >= S - U;
    then token[s] = initial[s] where f <= delays[s], else line[b, s, f mod T];  out[b, i] = token[order[i]].
  delay_line_out, for each slot b, n = frame[b] + 1:
    where exec_mask[b], line[b, g, n mod T] = generated[b, g] for g < G;
    then out[b, g] = line[b, g, (n - M + delays[g]) mod T] where n > M, else -1;
    valid_out[b] = n > M and exec_mask[b];  frame[b] = n where exec_mask[b].
A slot outside the execution mask keeps its line and frame exactly; its tokens are still read (Helium
runs on them and writes nothing for it). `order` is not bounds-checked (that would need a host sync): an
entry outside [0, S) reads another slot's line, or out of memory.

Design: grid (B,), one program of one warp per slot, vectors over the streams. Each program reads the
line positions it needs before it writes, and where a read position is the one it writes, takes the
written token from its registers: its store and its loads never race, and a slot whose mask is off
stores nothing. The writes go over the streams by index (every user stream, every generated stream),
the reads through `order`, so any order, even one that repeats or leaves out a stream, gives the
reference's result. Graph-safe: no host sync, the only Python values are shapes and strides, nothing
allocated but the outputs when they are None. With programmatic dependent launch each kernel waits for
the previous one first: all it reads but delays, initial and order is written by the step's earlier
launches, and those three are too small to be worth reading before the wait.

Floor: a few hundred bytes a slot, 8 a token (delay_line_in at Moshi's config: 17 line tokens and 8
codes read, 8 codes stored, 17 tokens written out; delay_line_out: 9 generated tokens read and stored, 9
line tokens read, 9 written out), 26 and 20 KB at B = 64: nanoseconds of HBM time. The launch and two
dependent memory latencies (the frame, order and delays; then the line) are the floor instead. Each
replaces the LM step's torch ops, 10 launches before Helium and 14 after the depth transformer. In a
development run on an H100 (bench/bench_delay_line.py, 50 calls a CUDA graph, PDL on; its JSON was not
kept, bench/RESULTS.md): 1.5 to 1.6 us a call at B = 1, 8 and 64, against 14.9 to 24.4 us (in) and 22.0
to 28.4 us (out, one reduction more than the step ran) for the torch references.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import await_previous_kernel, check_launch_devices, next_pow2, pdl, spans_overlap

INDEX_DTYPE = torch.int64
NO_TOKEN = -1
"""delay_line_out's token where the delays have not filled yet."""


def delay_line_in_ref(line, frame, exec_mask, user_codes, delays, initial, order, out=None):
    """Torch reference, the spec: writes the user's codes into `line` (running slots only) and returns
    this frame's input tokens in `order` ([B, S] int64, into out when given)."""
    span = line.shape[-1]
    first_user = line.shape[1] - user_codes.shape[1]
    user_line = line[:, first_user:]
    write_at = ((frame[:, None] + delays[None, first_user:]) % span)[..., None]
    kept = user_line.gather(-1, write_at)
    user_line.scatter_(-1, write_at, torch.where(exec_mask[:, None, None], user_codes[..., None], kept))
    read_at = (frame % span)[:, None, None].expand(-1, line.shape[1], 1)
    tokens = line.gather(-1, read_at)[..., 0]
    tokens = torch.where(frame[:, None] <= delays[None, :], initial[None, :], tokens)
    tokens = tokens.index_select(1, order)
    if out is None:
        return tokens
    out.copy_(tokens)
    return out


def delay_line_out_ref(line, frame, exec_mask, generated, delays, out=None, valid_out=None):
    """Torch reference, the spec: stores `generated` into `line` and advances `frame` (running slots
    only); returns (the delayed output tokens [B, G] int64, valid [B] bool), into out / valid_out when
    given."""
    span = line.shape[-1]
    own_line = line[:, :generated.shape[1]]
    next_frame = frame + 1
    store_at = (next_frame % span)[:, None, None].expand(-1, generated.shape[1], 1)
    kept = own_line.gather(-1, store_at)
    own_line.scatter_(-1, store_at, torch.where(exec_mask[:, None, None], generated[..., None], kept))
    max_delay = delays.max()
    out_at = ((next_frame[:, None] - max_delay + delays[None, :generated.shape[1]]) % span)[..., None]
    tokens = own_line.gather(-1, out_at)[..., 0]
    valid = next_frame > max_delay
    tokens = torch.where(valid[:, None], tokens, torch.full_like(tokens, NO_TOKEN))
    frame.add_(exec_mask)
    valid = valid & exec_mask
    if out is None:
        out = tokens
    else:
        out.copy_(tokens)
    if valid_out is None:
        valid_out = valid
    else:
        valid_out.copy_(valid)
    return out, valid_out


@triton.jit
def _wrap(position, SPAN):
    """position mod SPAN in [0, SPAN), as torch's % gives it (Triton's % keeps the dividend's sign)."""
    wrapped = position % SPAN
    return tl.where(wrapped < 0, wrapped + SPAN, wrapped)


@triton.jit
def _delay_line_in_kernel(
    line_ptr, frame_ptr, mask_ptr, codes_ptr, delays_ptr, initial_ptr, order_ptr, out_ptr,
    SPAN, stride_line_b, stride_line_s, stride_line_t, stride_frame, stride_mask, stride_codes_b,
    stride_codes_u, stride_delays, stride_initial, stride_order, stride_out_b, stride_out_s,
    STREAMS: tl.constexpr, USER_STREAMS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_U: tl.constexpr,
    PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    slot = tl.program_id(0).to(tl.int64)
    frame = tl.load(frame_ptr + slot * stride_frame)
    running = tl.load(mask_ptr + slot * stride_mask) != 0
    line_row = line_ptr + slot * stride_line_b
    codes_row = codes_ptr + slot * stride_codes_b
    first_user = STREAMS - USER_STREAMS

    offs_s = tl.arange(0, BLOCK_S)
    in_streams = offs_s < STREAMS
    streams = tl.load(order_ptr + offs_s * stride_order, mask=in_streams, other=0)
    delays = tl.load(delays_ptr + streams * stride_delays, mask=in_streams, other=0)
    read_at = _wrap(frame, SPAN)
    tokens = tl.load(line_row + streams * stride_line_s + read_at * stride_line_t, mask=in_streams)
    if running:
        # A user stream whose write lands on the position read this frame (delay 0) reads the code it
        # writes, taken from registers: the read never races the store.
        reads_own_write = in_streams & (streams >= first_user) & (_wrap(frame + delays, SPAN) == read_at)
        codes = tl.load(codes_row + (streams - first_user) * stride_codes_u, mask=reads_own_write)
        tokens = tl.where(reads_own_write, codes, tokens)
        offs_u = tl.arange(0, BLOCK_U)
        in_user = offs_u < USER_STREAMS
        user_delays = tl.load(delays_ptr + (first_user + offs_u) * stride_delays, mask=in_user)
        user_codes = tl.load(codes_row + offs_u * stride_codes_u, mask=in_user)
        write_at = _wrap(frame + user_delays, SPAN)
        tl.store(line_row + (first_user + offs_u) * stride_line_s + write_at * stride_line_t, user_codes,
                 mask=in_user)
    initial = tl.load(initial_ptr + streams * stride_initial, mask=in_streams)
    tokens = tl.where(frame <= delays, initial, tokens)
    tl.store(out_ptr + slot * stride_out_b + offs_s * stride_out_s, tokens, mask=in_streams)


@triton.jit
def _delay_line_out_kernel(
    line_ptr, frame_ptr, mask_ptr, generated_ptr, delays_ptr, out_ptr, valid_ptr,
    SPAN, stride_line_b, stride_line_s, stride_line_t, stride_frame, stride_mask, stride_generated_b,
    stride_generated_g, stride_delays, stride_out_b, stride_out_g, stride_valid,
    STREAMS: tl.constexpr, OWN_STREAMS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
    NO_TOKEN: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    slot = tl.program_id(0).to(tl.int64)
    frame = tl.load(frame_ptr + slot * stride_frame)
    running = tl.load(mask_ptr + slot * stride_mask) != 0
    # Lanes past the last stream read the last delay again, which leaves the maximum as it is.
    every_stream = tl.minimum(tl.arange(0, BLOCK_S), STREAMS - 1)
    max_delay = tl.max(tl.load(delays_ptr + every_stream * stride_delays), axis=0)

    offs_g = tl.arange(0, BLOCK_G)
    in_own = offs_g < OWN_STREAMS
    next_frame = frame + 1
    store_at = _wrap(next_frame, SPAN)
    delays = tl.load(delays_ptr + offs_g * stride_delays, mask=in_own, other=0)
    out_at = _wrap(next_frame - max_delay + delays, SPAN)
    own_rows = line_ptr + slot * stride_line_b + offs_g * stride_line_s
    delayed = tl.load(own_rows + out_at * stride_line_t, mask=in_own)
    tokens = delayed
    if running:
        generated_row = generated_ptr + slot * stride_generated_b
        generated = tl.load(generated_row + offs_g * stride_generated_g, mask=in_own)
        # A stream of delay max_delay outputs the token stored this frame, taken from registers: the read
        # never races the store.
        tokens = tl.where(out_at == store_at, generated, delayed)
        tl.store(own_rows + store_at * stride_line_t, generated, mask=in_own)
        tl.store(frame_ptr + slot * stride_frame, next_frame)
    valid = next_frame > max_delay
    tokens = tl.where(valid, tokens, NO_TOKEN)
    tl.store(out_ptr + slot * stride_out_b + offs_g * stride_out_g, tokens, mask=in_own)
    tl.store(valid_ptr + slot * stride_valid, valid & running)


def _check_vector(name: str, t: torch.Tensor, size: int, dtype: torch.dtype, what: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.shape != (size,):
        raise ValueError(f"{name} must be [{size}] ({what}), got {list(t.shape)}")


def _check_line_state(line: torch.Tensor, frame: torch.Tensor, exec_mask: torch.Tensor,
                      delays: torch.Tensor) -> tuple[int, int]:
    """(B, S) of the operands both launchers take, checked."""
    if line.dtype != INDEX_DTYPE:
        raise TypeError(f"line must be {INDEX_DTYPE}, got {line.dtype}")
    if line.dim() != 3 or line.shape[1] < 1 or line.shape[2] < 1:
        raise ValueError(f"line must be [B, S, T] with at least one stream and one position, "
                         f"got {list(line.shape)}")
    batch, streams, _ = line.shape
    _check_vector("frame", frame, batch, INDEX_DTYPE, "one frame index per slot")
    _check_vector("exec_mask", exec_mask, batch, torch.bool, "one flag per slot")
    _check_vector("delays", delays, streams, INDEX_DTYPE, "one delay per stream")
    return batch, streams


def _check_tokens(name: str, t: torch.Tensor, batch: int, max_streams: int) -> int:
    """The column count n of a [B, n] int64 operand, n <= max_streams."""
    if t.dtype != INDEX_DTYPE:
        raise TypeError(f"{name} must be {INDEX_DTYPE}, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] != batch or t.shape[1] > max_streams:
        raise ValueError(f"{name} must be [{batch}, n] with n <= {max_streams} (the line's streams), "
                         f"got {list(t.shape)}")
    return t.shape[1]


def _check_output(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                  state: tuple[torch.Tensor, ...]) -> None:
    if t.shape != shape or t.dtype != dtype:
        raise ValueError(f"{name} must be {list(shape)} {dtype}, got {list(t.shape)} {t.dtype}")
    if t.numel() and any(s.numel() and spans_overlap(t, s) for s in state):
        raise ValueError(f"{name} must not overlap the line or the frame counter")


def delay_line_in(line: torch.Tensor, frame: torch.Tensor, exec_mask: torch.Tensor, user_codes: torch.Tensor,
                  delays: torch.Tensor, initial: torch.Tensor, order: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher; see the module doc. Writes the user's codes into `line`; returns out ([B, S] int64)."""
    batch, streams = _check_line_state(line, frame, exec_mask, delays)
    user_streams = _check_tokens("user_codes", user_codes, batch, streams)
    _check_vector("initial", initial, streams, INDEX_DTYPE, "one initial token per stream")
    _check_vector("order", order, streams, INDEX_DTYPE, "one stream per output column")
    if out is None:
        out = torch.empty(batch, streams, dtype=INDEX_DTYPE, device=line.device)
    _check_output("out", out, (batch, streams), INDEX_DTYPE, (line, frame))
    check_launch_devices(line, frame, exec_mask, user_codes, delays, initial, order, out)
    if batch == 0:
        return out
    use_pdl = pdl(out.device, "delay_line")
    _delay_line_in_kernel[(batch,)](
        line, frame, exec_mask, user_codes, delays, initial, order, out,
        line.shape[2], *line.stride(), frame.stride(0), exec_mask.stride(0), *user_codes.stride(),
        delays.stride(0), initial.stride(0), order.stride(0), *out.stride(),
        STREAMS=streams, USER_STREAMS=user_streams, BLOCK_S=next_pow2(streams, minimum=1),
        BLOCK_U=next_pow2(user_streams, minimum=1), PDL=use_pdl, num_warps=1, launch_pdl=use_pdl,
    )
    return out


def delay_line_out(line: torch.Tensor, frame: torch.Tensor, exec_mask: torch.Tensor, generated: torch.Tensor,
                   delays: torch.Tensor, out: torch.Tensor | None = None,
                   valid_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; see the module doc. Stores `generated` into `line` and advances `frame`; returns
    (out [B, G] int64, valid_out [B] bool)."""
    batch, streams = _check_line_state(line, frame, exec_mask, delays)
    own_streams = _check_tokens("generated", generated, batch, streams)
    if out is None:
        out = torch.empty(batch, own_streams, dtype=INDEX_DTYPE, device=line.device)
    if valid_out is None:
        valid_out = torch.empty(batch, dtype=torch.bool, device=line.device)
    _check_output("out", out, (batch, own_streams), INDEX_DTYPE, (line, frame))
    _check_output("valid_out", valid_out, (batch,), torch.bool, (line, frame))
    check_launch_devices(line, frame, exec_mask, generated, delays, out, valid_out)
    if batch == 0:
        return out, valid_out
    use_pdl = pdl(out.device, "delay_line")
    _delay_line_out_kernel[(batch,)](
        line, frame, exec_mask, generated, delays, out, valid_out,
        line.shape[2], *line.stride(), frame.stride(0), exec_mask.stride(0), *generated.stride(),
        delays.stride(0), *out.stride(), valid_out.stride(0),
        STREAMS=streams, OWN_STREAMS=own_streams, BLOCK_S=next_pow2(streams, minimum=1),
        BLOCK_G=next_pow2(own_streams, minimum=1), NO_TOKEN=NO_TOKEN, PDL=use_pdl, num_warps=1,
        launch_pdl=use_pdl,
    )
    return out, valid_out
