"""The public API: `MimiCodec` (the codec alone) and `FastMoshi` (full-duplex speech to speech).

A Moshi frame is 80 ms: 1920 samples of the user's 24 kHz audio go in, 1920 samples of Moshi's audio
and at most one text token come out. `FastMoshi.step` runs, for every slot (conversation) at once,
exactly Kyutai's library loop with `MimiModel` + `LMModel` + `LMGen` in streaming mode:

    codes = mimi.encode(frame);  tokens = lm_gen.step(codes);  pcm = mimi.decode(tokens[:, 1:])

where `lm_gen.step` returns nothing on a conversation's first frame; that frame yields silence
and token ids -1. This module holds no math: it validates input, moves data, and drives the
backend's models and their per-slot streaming state.
"""
from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import graphs
from .config import MimiConfig, MoshiConfig, moshiko
from .fast import moshi as fast_moshi
from .fast.lm import FastLM
from .fast.mimi import FastMimi, FastMimiRunner
from .fast.moshi import FastFrameRunner, FrameOutput
from .reference.attention import CACHE_DTYPES_8BIT
from .reference.lm import LM, SamplingParams, StreamingLM
from .reference.mimi import Mimi
from .tokenizer import TextTokenizer
from .weights import find_moshi_checkpoint, load_lm, load_mimi, random_init_

BACKENDS = ("reference", "fast")
"""reference: the eager PyTorch spec. fast: Triton kernels (their torch references off CUDA); FastMoshi's
whole frame (encode, LM step, decode) is one CUDA-graph replay, MimiCodec's each direction."""


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available in this build: {', '.join(BACKENDS)}")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_audio_type(value, what: str) -> None:
    """Raises ValueError unless `value` is a floating-point numpy array or torch tensor."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise ValueError(f"{what} must be floating point audio, got dtype {value.dtype}")
    elif not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} must be a numpy array or a torch tensor, got {type(value).__name__}")
    elif not value.is_floating_point():
        raise ValueError(f"{what} must be floating point audio, got dtype {value.dtype}")


def _as_float_tensor(value, what: str) -> torch.Tensor:
    """Validates that `value` is a finite float array/tensor, without changing any state."""
    _check_audio_type(value, what)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} contains NaN or Inf samples")
    return value


def _host_audio(value, what: str) -> np.ndarray:
    """`value`, a float numpy array or torch tensor, as a numpy array on the host (a view where it is one already);
    checks the type, not the values. No torch CPU kernel runs on it: over a whole batch of frames those run on
    torch's thread pool (see _HostBuffers). A CPU tensor of a numpy dtype costs no torch operation besides its numpy
    view: at an 80 ms cadence each one is tens of microseconds of cold host code in the step's latency."""
    _check_audio_type(value, what)
    if isinstance(value, np.ndarray):
        return value
    if not value.is_cpu or value.dtype not in _NUMPY_AUDIO_DTYPES:
        value = value.to("cpu", torch.float32)
    return value.numpy(force=value.requires_grad)


_NUMPY_AUDIO_DTYPES = (torch.float16, torch.float32, torch.float64)


def _write_audio(buffer: np.ndarray, index, audio: np.ndarray) -> None:
    """buffer[index] = audio (float32 buffer). A float64 value beyond float32 becomes Inf, without numpy's overflow
    warning: the caller reports it with NaN and Inf. float16 and float32 audio cannot overflow, and skip the guard
    (a few microseconds a step)."""
    if audio.dtype.itemsize <= 4:
        buffer[index] = audio
        return
    with np.errstate(over="ignore"):
        buffer[index] = audio


class _HostBuffers:
    """The host's side of a FastMoshi step, in buffers made once: the frames and the execution mask gathered row by
    row with numpy, then sent to the device in one copy each; the pcm and tokens received in one copy each, then
    handed out in slot order. On a CUDA engine the buffers are pinned, so that each crossing is one asynchronous
    copy and the step waits on the GPU once. The host's work stays on the calling thread (numpy), where torch's CPU
    kernels over a whole batch would run on its thread pool.

    Every call here is on the step's latency path, and at an 80 ms cadence each runs cold (tens of microseconds a
    torch or CUDA call on a GPU's host, bench/RESULTS.md): the frames' reuse is guarded by a flag, not an event, an
    unchanged mask is not rewritten, and rows in slot order are copied out as slices."""

    def __init__(self, max_batch: int, frame_size: int, token_columns: int, device: torch.device):
        self.device = device
        self._cuda = pinned = device.type == "cuda"
        self.frames = torch.zeros(max_batch, 1, frame_size, pin_memory=pinned)
        self.mask = torch.zeros(max_batch, dtype=torch.bool, pin_memory=pinned)
        self.pcm = torch.zeros(max_batch, frame_size, pin_memory=pinned)
        self.tokens = torch.zeros(max_batch, token_columns, dtype=torch.int64, pin_memory=pinned)
        # numpy views of the same memory, made once: a step's host work is a few microseconds of numpy.
        self._frames_np, self._mask_np = self.frames.numpy()[:, 0], self.mask.numpy()
        self._pcm_np, self._tokens_np = self.pcm.numpy(), self.tokens.numpy()
        # Whether copies issued by a step may still read the frames and mask: set when a step sends them, cleared
        # when it receives (its synchronisation waits for them). It stays set only after a step that failed in
        # between, and the next writer then waits for the device.
        self._inputs_in_flight = False
        self._mask_rows: tuple | None = None
        self._in_order = list(range(max_batch))

    def in_order(self, rows: Sequence[int]) -> bool:
        """Whether rows are 0..n-1 in order: their frames and outputs then move as one slice."""
        return rows == self._in_order[:len(rows)]

    def _await_inputs(self) -> None:
        if self._inputs_in_flight:
            torch.cuda.synchronize(self.device)
            self._inputs_in_flight = False

    def writable_frames(self, bucket: int) -> np.ndarray:
        """The first `bucket` rows of the frame buffer [bucket, frame_size] as numpy, once the last step's copy
        has read them."""
        self._await_inputs()
        return self._frames_np[:bucket]

    def set_mask(self, bucket: int, rows: Sequence[int]) -> None:
        """The execution mask's first `bucket` entries: True at the given rows."""
        key = (bucket, *rows)
        if key == self._mask_rows:
            return
        self._await_inputs()
        mask = self._mask_np[:bucket]
        mask[:] = False
        mask[list(rows)] = True
        self._mask_rows = key

    def sent(self) -> None:
        """Marks the frames and mask as read by copies the device's stream has been given (writable_frames and
        set_mask wait for them until receive)."""
        self._inputs_in_flight = self._cuda

    def send(self, bucket: int, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames [bucket, 1, frame_size] and the execution mask [bucket] (the given rows) on the device."""
        self.set_mask(bucket, rows)
        sent = (self.frames[:bucket].to(self.device, non_blocking=True),
                self.mask[:bucket].to(self.device, non_blocking=True))
        self.sent()
        return sent

    def receive(self, out: FrameOutput, bucket: int, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(pcm [n, frame_size] float32, tokens [n, 1 + dep_q] int64) of the given rows of a step of `bucket`
        rows, in their order, on the host as numpy: the caller's own copies."""
        self.pcm[:bucket].copy_(out.pcm[:, 0], non_blocking=True)
        self.tokens[:bucket].copy_(out.tokens, non_blocking=True)
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self._inputs_in_flight = False
        if self.in_order(rows):
            return self._pcm_np[:len(rows)].copy(), self._tokens_np[:len(rows)].copy()
        rows = list(rows)
        return self._pcm_np[rows], self._tokens_np[rows]


def _as_codes(value, num_codebooks: int, cardinality: int) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dtype == torch.bool:
        raise ValueError("codes must be an integer array or tensor")
    if value.dim() != 3 or value.shape[1] != num_codebooks:
        raise ValueError(f"codes must have shape [B, {num_codebooks}, T], got {list(value.shape)}")
    if value.numel() and (int(value.min()) < 0 or int(value.max()) >= cardinality):
        raise ValueError(f"codes must lie in [0, {cardinality})")
    return value.long()


class MimiCodec:
    """Mimi, the 12.5 Hz neural audio codec: pcm [B, 1, T] at 24 kHz <-> codes [B, 8, frames] in [0, 2048).

    `encode`/`decode` process whole signals (a signal is zero-padded on the right to whole frames,
    as Kyutai and transformers do); `stream(batch_size)` gives frame-by-frame streaming with carried
    state. A whole-signal call is the same computation as streaming its frames from a fresh state.
    backend "fast" runs Triton kernels, each direction one CUDA-graph replay per frame (`eager=True`
    runs the same step functions without graphs, for debugging).
    """

    def __init__(self, model: Mimi, device: torch.device, backend: str = "reference", eager: bool = False):
        _check_backend(backend)
        if backend == "fast" and not isinstance(model, FastMimi):
            raise ValueError("the fast backend needs a FastMimi model")
        self.model = model
        self.config: MimiConfig = model.config
        self.device = device
        self.backend = backend
        self.eager = eager

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        backend: str = "reference", num_codebooks: int = 8, eager: bool = False) -> "MimiCodec":
        """path: Kyutai's Mimi .safetensors file, a Kyutai checkpoint directory, or a transformers
        MimiModel / MoshiForConditionalGeneration `save_pretrained` directory."""
        _check_backend(backend)
        device = torch.device(device) if device is not None else _default_device()
        model = load_mimi(path, _MIMI_CLASSES[backend], device, num_codebooks=num_codebooks)
        return cls(_prepared(model), device, backend, eager)

    @classmethod
    def random(cls, config: MimiConfig | None = None, device: str | torch.device | None = None,
               backend: str = "reference", seed: int = 0, eager: bool = False) -> "MimiCodec":
        """Random weights (non-zero codebooks) at the given config, default the real one."""
        _check_backend(backend)
        device = torch.device(device) if device is not None else _default_device()
        model = _random_module(lambda: _MIMI_CLASSES[backend](config or MimiConfig()), torch.float32, device, seed)
        return cls(_prepared(model), device, backend, eager)

    @property
    def frame_size(self) -> int:
        return self.config.frame_size

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def stream(self, batch_size: int = 1) -> "MimiStream":
        return MimiStream(self, batch_size)

    def _pcm(self, pcm) -> torch.Tensor:
        pcm = _as_float_tensor(pcm, "pcm")
        if pcm.dim() != 3 or pcm.shape[1] != 1:
            raise ValueError(f"pcm must have shape [B, 1, T], got {list(pcm.shape)}")
        if pcm.shape[-1] == 0:
            raise ValueError("pcm is empty")
        return pcm.to(self.device, torch.float32)

    @torch.inference_mode()
    def encode(self, pcm) -> torch.Tensor:
        """pcm [B, 1, T] float -> codes [B, num_codebooks, ceil(T / frame_size)] int64."""
        pcm = self._pcm(pcm)
        frames = -(-pcm.shape[-1] // self.frame_size)
        pcm = torch.nn.functional.pad(pcm, (0, frames * self.frame_size - pcm.shape[-1]))
        stream = self.stream(pcm.shape[0])
        return torch.cat([stream.encode(chunk) for chunk in pcm.split(self.frame_size, dim=-1)], dim=-1)

    @torch.inference_mode()
    def decode(self, codes) -> torch.Tensor:
        """codes [B, num_codebooks, F] -> pcm [B, 1, F * frame_size] float32."""
        codes = _as_codes(codes, self.config.num_codebooks, self.config.codebook_size).to(self.device)
        stream = self.stream(codes.shape[0])
        return torch.cat([stream.decode(codes[..., t:t + 1]) for t in range(codes.shape[-1])], dim=-1)


class MimiStream:
    """Frame-by-frame Mimi for `batch_size` independent streams."""

    def __init__(self, codec: MimiCodec, batch_size: int):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.codec = codec
        self.batch_size = batch_size
        self._runner = _mimi_runner(codec.model, batch_size, codec.device, codec.eager)
        self._all = torch.ones(batch_size, dtype=torch.bool, device=codec.device)

    @torch.inference_mode()
    def encode(self, frame) -> torch.Tensor:
        """frame [B, 1, frame_size] float -> codes [B, num_codebooks, 1] int64."""
        frame = self.codec._pcm(frame)
        if frame.shape[0] != self.batch_size or frame.shape[-1] != self.codec.frame_size:
            raise ValueError(f"frame must have shape [{self.batch_size}, 1, {self.codec.frame_size}], "
                             f"got {list(frame.shape)}")
        return self._runner.encode(frame, self._all)

    @torch.inference_mode()
    def decode(self, codes) -> torch.Tensor:
        """codes [B, num_codebooks, 1] -> pcm [B, 1, frame_size] float32."""
        config = self.codec.config
        codes = _as_codes(codes, config.num_codebooks, config.codebook_size)
        if codes.shape[0] != self.batch_size or codes.shape[-1] != 1:
            raise ValueError(f"codes must have shape [{self.batch_size}, {config.num_codebooks}, 1], "
                             f"got {list(codes.shape)}")
        return self._runner.decode(codes.to(self.codec.device), self._all)

    def reset(self, slot: int | None = None) -> None:
        self._runner.reset(_slot_mask(slot, self.batch_size, self.codec.device))


class _ReferenceMimiRunner:
    """The reference codec's streaming state for a batch (the fast backend's twin is FastMimiRunner).
    encode/decode take an execution mask [B]: slots outside it keep their state."""

    def __init__(self, model: Mimi, batch_size: int, device: torch.device):
        self.model = model
        self._encoder_state = model.init_encoder_state(batch_size)
        self._decoder_state = model.init_decoder_state(batch_size)

    def encode(self, frame: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_step(frame, self._encoder_state, exec_mask)

    def decode(self, codes: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        return self.model.decode_step(codes, self._decoder_state, exec_mask)

    def narrow(self, batch_size: int) -> "_ReferenceMimiRunner":
        """The first batch_size streams, on views of this runner's state."""
        narrowed = copy.copy(self)
        narrowed._encoder_state = self._encoder_state.narrow(batch_size)
        narrowed._decoder_state = self._decoder_state.narrow(batch_size)
        return narrowed

    def reset(self, slots: torch.Tensor) -> None:
        self._encoder_state.reset(slots)
        self._decoder_state.reset(slots)

    def swap(self, a: int, b: int) -> None:
        self._encoder_state.swap(a, b)
        self._decoder_state.swap(a, b)


class _ReferenceFrameRunner:
    """The reference backend's frame for `batch_size` slots: either codec runner around the eager
    reference LM (the fast backend's twin is FastFrameRunner). With the reference codec a step of b slots
    runs slots 0..b-1 on views of the state, for any bucket b; with the fast codec (its graphs are
    captured for all the slots) every step runs all of them."""

    def __init__(self, mimi: Mimi, lm: LM, batch_size: int, params: SamplingParams, device: torch.device,
                 eager: bool, buckets: Sequence[int] | None = None, kv_dtype: torch.dtype | None = None):
        self.batch_size = batch_size
        self.params = params
        self.dep_q = lm.config.dep_q
        self.generator = StreamingLM(lm)
        self.codec = _mimi_runner(mimi, batch_size, device, eager)
        self.lm_state = self.generator.init_state(batch_size, kv_dtype)
        narrowable = isinstance(self.codec, _ReferenceMimiRunner)
        self.buckets = graphs.batch_buckets(batch_size, buckets) if narrowable else (batch_size,)
        # Views of the first b slots' state per bucket, made once (swaps and resets are in place).
        self._views = {size: (self.codec.narrow(size), self.lm_state.narrow(size), params.narrow(size))
                       for size in self.buckets if size != batch_size}
        self._views[batch_size] = (self.codec, self.lm_state, params)

    @torch.inference_mode()
    def step(self, pcm: torch.Tensor, exec_mask: torch.Tensor, forced: torch.Tensor | None = None) -> FrameOutput:
        """pcm [b, 1, frame_size] for slots 0..b-1 (b one of the buckets), exec_mask [b], forced [b, 1 + dep_q]
        (teacher forcing) or None -> the frame's outputs."""
        views = self._views.get(pcm.shape[0])
        if views is None:
            raise ValueError(f"no bucket for a batch of {pcm.shape[0]}; buckets: {self.buckets}")
        codec, state, params = views
        codes = codec.encode(pcm, exec_mask)[..., 0]
        out = self.generator.step(codes[:, :self.dep_q], state, exec_mask, params, forced=forced)
        decoded = codec.decode(out.tokens[:, 1:].clamp(min=0)[..., None], out.valid)
        pcm_out = torch.where(out.valid[:, None, None], decoded, torch.zeros_like(decoded))
        return FrameOutput(pcm_out, out.tokens, out.valid, codes, out.text_logits, out.audio_logits)

    def reset(self, slots: torch.Tensor) -> None:
        self.codec.reset(slots)
        self.lm_state.reset(slots)

    def swap(self, a: int, b: int) -> None:
        self.codec.swap(a, b)
        self.lm_state.swap(a, b)
        self.params.swap(a, b)


KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn}
"""Names of the KV cache dtypes besides the LM's own (FastMoshi's kv_dtype, the CLI's --kv-cache)."""


def kv_cache_dtype(kv_dtype: torch.dtype | str | None, lm_dtype: torch.dtype) -> torch.dtype | None:
    """FastMoshi's kv_dtype checked: None (the LM's dtype), the LM's dtype itself, torch.float8_e4m3fn, or
    a name in KV_CACHE_DTYPES ("fp8"); returns the dtype, None for the LM's."""
    if isinstance(kv_dtype, str):
        if kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_CACHE_DTYPES)} or a torch dtype, got {kv_dtype!r}")
        kv_dtype = KV_CACHE_DTYPES[kv_dtype]
    if kv_dtype is None or kv_dtype == lm_dtype:
        return None
    if kv_dtype not in CACHE_DTYPES_8BIT:
        raise ValueError(f"kv_dtype must be the LM's dtype ({lm_dtype}) or one of {CACHE_DTYPES_8BIT}, "
                         f"got {kv_dtype}")
    return kv_dtype


_MIMI_CLASSES = {"reference": Mimi, "fast": FastMimi}
_LM_CLASSES = {"reference": LM, "fast": FastLM}


def _mimi_runner(model: Mimi, batch_size: int, device: torch.device, eager: bool):
    if isinstance(model, FastMimi):
        return FastMimiRunner(model, batch_size, device, eager=eager)
    return _ReferenceMimiRunner(model, batch_size, device)


def _prepared(model):
    """A fast model after its one-time `prepare()` (derived tensors); a reference model as it is."""
    return model.prepare() if isinstance(model, (FastMimi, FastLM)) else model


def _print_progress(done: int, total: int) -> None:
    if done * 10 // total != (done - 1) * 10 // total:
        print(f"loading LM weights: {100 * done // total}%", file=sys.stderr, end="\n" if done == total else "\r",
              flush=True)


def _random_module(factory, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """factory() with random weights, allocated once, directly in dtype on device."""
    with torch.device("meta"):
        module = factory().to(dtype)
    return random_init_(module.to_empty(device=device), seed).eval().requires_grad_(False)


def _slot_mask(slot: int | None, batch_size: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
    if slot is None:
        mask[:] = True
    elif isinstance(slot, (int, np.integer)) and not isinstance(slot, bool) and 0 <= slot < batch_size:
        mask[int(slot)] = True
    else:
        raise ValueError(f"slot must be an int in [0, {batch_size}) or None, got {slot!r}")
    return mask


@dataclass
class StepOutput:
    """One 80 ms frame of output for the n slots that stepped (tensors on the CPU), row i for slots[i]."""

    pcm: torch.Tensor
    """[n, 1920] float32, Moshi's audio at 24 kHz (silence on a conversation's first frame)."""
    text_tokens: torch.Tensor
    """[n] int64, the text token of the frame (-1 on a conversation's first frame)."""
    audio_codes: torch.Tensor
    """[n, 8] int64, the Mimi codes decoded into pcm (-1 on a conversation's first frame)."""
    text: list[str] | None
    """Text piece per slot ("" for padding and for no token); None when there is no tokenizer."""
    slots: list[int]
    """The slot of each row."""
    bucket: int
    """The batch size the step ran at: the smallest of the engine's buckets that held these slots."""


class SlotsBusyError(RuntimeError):
    """Every conversation slot of the engine is in use."""


class FastMoshi:
    """Moshi, full duplex: `step(frames)` every 80 ms for up to `max_batch` conversations at once.

    Build with `from_pretrained(path)` (Kyutai or transformers checkpoint directory) or
    `random(config)` (random weights, for timing and tests). Sampling follows Kyutai's defaults
    (text temperature 0.7, top-k 25; audio temperature 0.8, top-k 250); `use_sampling=False` is
    greedy. Each slot draws from its own counter-based random stream: slot i uses `seed + i` unless
    `open(seed=...)` gives it another.

    Two ways to drive it: `step(frames[max_batch, 1920])` steps every slot; or `open()` a slot per
    conversation, `step({slot: frame, ...})` with the frames of the conversations that have audio
    this frame (the others keep their state untouched), and `close(slot)` when one ends.

    Batch buckets: a step runs the smallest bucket size (`batch_buckets`, by default the powers of two
    below max_batch, and max_batch) that holds the open conversations, on the first rows of the state;
    the engine keeps the open conversations there, moving the last one into the place of one that
    closes, so n open conversations run on the bucket >= n whatever slot ids they hold. The fast backend
    captures one CUDA graph per bucket.

    KV cache: `kv_dtype` None keeps Helium's keys and values in the LM's dtype, as Kyutai's engine does;
    torch.float8_e4m3fn (or "fp8") stores them in 8 bits: half the memory per conversation (0.79 instead of
    1.59 GB at a full 3000-token window) and half the bytes each step's attention reads, at the cost of
    e4m3's rounding of every key and value (3 mantissa bits: outputs no longer match Kyutai's to bf16
    precision). The reference backend applies the same rounding, so the two backends still agree.
    """

    def __init__(self, config: MoshiConfig, lm: LM, mimi: Mimi, tokenizer: TextTokenizer | None,
                 device: torch.device, max_batch: int = 1, use_sampling: bool = True, temp: float = 0.8,
                 temp_text: float = 0.7, top_k: int = 250, top_k_text: int = 25, seed: int | None = None,
                 eager: bool = False, batch_buckets: Sequence[int] | None = None,
                 kv_dtype: torch.dtype | str | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        kv_dtype = kv_cache_dtype(kv_dtype, lm.text_head.dtype)
        batch_buckets = graphs.batch_buckets(max_batch, batch_buckets)
        if not 1 <= top_k <= config.lm.card or not 1 <= top_k_text <= config.lm.text_card:
            raise ValueError(f"top_k must be in [1, {config.lm.card}] and top_k_text in [1, {config.lm.text_card}]")
        if temp < 0 or temp_text < 0:
            raise ValueError("temperatures must be >= 0 (0 is greedy)")
        self.config = config
        self.device = device
        self.max_batch = max_batch
        self.tokenizer = tokenizer
        if isinstance(lm, FastLM) and not isinstance(mimi, FastMimi):
            raise ValueError("a FastLM runs in the fast frame, which needs a FastMimi codec as well")
        self.backend = "fast" if isinstance(lm, FastLM) else "reference"
        self.mimi = mimi
        self.lm = lm
        if seed is None:
            seed = int.from_bytes(os.urandom(7), "little")
        self.seed = seed
        self.sampling = {"use_sampling": use_sampling, "temp": temp, "temp_text": temp_text, "top_k": top_k,
                         "top_k_text": top_k_text}
        self.kv_dtype = kv_dtype or lm.text_head.dtype
        self._sampling = self._sampling_params(use_sampling, temp, temp_text, top_k, top_k_text, seed)
        self._host = _HostBuffers(max_batch, config.mimi.frame_size, 1 + config.lm.dep_q, device)
        # Fast backend: the frame's graph copies the frames and mask from the host buffers itself (see
        # fast.moshi.HOST_INPUTS_IN_GRAPH).
        self._graph_reads_host = self.backend == "fast" and fast_moshi.HOST_INPUTS_IN_GRAPH
        if self.backend == "fast":
            host_inputs = (self._host.frames, self._host.mask) if self._graph_reads_host else None
            self._runner = FastFrameRunner(mimi, lm, max_batch, self._sampling, device, eager=eager,
                                           buckets=batch_buckets, kv_dtype=kv_dtype, host_inputs=host_inputs)
        else:
            self._runner = _ReferenceFrameRunner(mimi, lm, max_batch, self._sampling, device, eager,
                                                 buckets=batch_buckets, kv_dtype=kv_dtype)
        self._open = [False] * max_batch
        # Slot ids are what callers hold; rows index the state. The n open slots hold rows 0..n-1.
        self._row_of = list(range(max_batch))

    def _sampling_params(self, use_sampling, temp, temp_text, top_k, top_k_text, seed) -> SamplingParams:
        n, device = self.max_batch, self.device
        full = lambda value, dtype: torch.full((n,), value, dtype=dtype, device=device)  # noqa: E731
        return SamplingParams(
            text_temperature=full(temp_text if use_sampling else 0.0, torch.float32),
            text_top_k=full(top_k_text, torch.long),
            audio_temperature=full(temp if use_sampling else 0.0, torch.float32),
            audio_top_k=full(top_k, torch.long),
            seed=seed + torch.arange(n, dtype=torch.long, device=device),
            max_text_top_k=top_k_text, max_audio_top_k=top_k)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, backend: str = "reference", max_batch: int = 1,
                        progress: bool = True, eager: bool = False, **sampling) -> "FastMoshi":
        """path: a Kyutai checkpoint directory (model.safetensors, Mimi's file, tokenizer, optional
        config.json) or a transformers MoshiForConditionalGeneration `save_pretrained` directory.
        dtype defaults to bfloat16 on CUDA and float32 on the CPU; Mimi always runs in float32.
        With progress, loading the LM reports its progress on stderr."""
        _check_backend(backend)
        device = torch.device(device) if device is not None else _default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        checkpoint = find_moshi_checkpoint(path)
        config = checkpoint.config
        tokenizer = None
        if checkpoint.tokenizer_file is not None:
            tokenizer = TextTokenizer(checkpoint.tokenizer_file, (config.lm.text_end_padding_id,
                                                                  config.lm.text_padding_id))
        mimi = _prepared(load_mimi(Path(path), _MIMI_CLASSES[backend], device,
                                   num_codebooks=config.mimi.num_codebooks))
        lm = _prepared(load_lm(checkpoint, lambda: _LM_CLASSES[backend](config.lm), dtype, device,
                               _print_progress if progress else None))
        defaults = {k: v for k, v in config.lm_gen.items()
                    if k in ("use_sampling", "temp", "temp_text", "top_k", "top_k_text")}
        return cls(config, lm, mimi, tokenizer, device, max_batch, eager=eager, **{**defaults, **sampling})

    @classmethod
    def random(cls, config: MoshiConfig | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, backend: str = "reference", max_batch: int = 1,
               weights_seed: int = 0, tokenizer: TextTokenizer | None = None, eager: bool = False,
               **sampling) -> "FastMoshi":
        """Random weights at `config` (default: moshiko's real shapes)."""
        _check_backend(backend)
        config = config or moshiko()
        device = torch.device(device) if device is not None else _default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        mimi = _prepared(_random_module(lambda: _MIMI_CLASSES[backend](config.mimi), torch.float32, device,
                                        weights_seed))
        lm = _prepared(_random_module(lambda: _LM_CLASSES[backend](config.lm), dtype, device, weights_seed + 1))
        return cls(config, lm, mimi, tokenizer, device, max_batch, eager=eager, **sampling)

    @property
    def frame_size(self) -> int:
        return self.config.mimi.frame_size

    @property
    def sample_rate(self) -> int:
        return self.config.mimi.sample_rate

    def _frames(self, pcm) -> None:
        """Validates frames [max_batch, frame_size] (or [frame_size] when max_batch is 1) and writes them into
        the host buffer, slot i's frame at its row."""
        pcm = _host_audio(pcm, "frame")
        if pcm.ndim == 1 and self.max_batch == 1:
            pcm = pcm[None]
        if pcm.ndim != 2:
            raise ValueError(f"frames must have shape [{self.max_batch}, {self.frame_size}]"
                             f"{' or [%d]' % self.frame_size if self.max_batch == 1 else ''}, got {list(pcm.shape)}")
        if pcm.shape != (self.max_batch, self.frame_size):
            raise ValueError(f"frames must have shape [{self.max_batch}, {self.frame_size}] "
                             f"(one {self.frame_size}-sample frame per slot), got {list(pcm.shape)}")
        buffer = self._host.writable_frames(self.max_batch)
        _write_audio(buffer, slice(None) if self._host.in_order(self._row_of) else self._row_of, pcm)
        if not np.isfinite(buffer).all():
            finite = np.isfinite(buffer).all(axis=1)
            bad = [slot for slot, row in enumerate(self._row_of) if not finite[row]]
            raise ValueError(f"the frames of slots {bad} contain NaN or Inf samples (or values beyond float32)")

    @property
    def open_slots(self) -> list[int]:
        return [slot for slot, is_open in enumerate(self._open) if is_open]

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes a step can run at (one captured graph each on the fast backend)."""
        return self._runner.buckets

    def _swap_rows(self, a: int, b: int) -> None:
        if a == b:
            return
        self._runner.swap(a, b)
        slot_a, slot_b = self._row_of.index(a), self._row_of.index(b)
        self._row_of[slot_a], self._row_of[slot_b] = b, a

    def open(self, seed: int | None = None, use_sampling: bool | None = None, temp: float | None = None,
             temp_text: float | None = None, top_k: int | None = None, top_k_text: int | None = None) -> int:
        """Starts a conversation in a free slot and returns the slot id. Unset sampling parameters take
        the engine's; top_k and top_k_text may not exceed the engine's. Raises SlotsBusyError when all
        max_batch slots are open."""
        free = next((slot for slot, is_open in enumerate(self._open) if not is_open), None)
        if free is None:
            raise SlotsBusyError(f"all {self.max_batch} conversation slots are busy")
        d = self.sampling
        use_sampling = d["use_sampling"] if use_sampling is None else use_sampling
        temp = d["temp"] if temp is None else temp
        temp_text = d["temp_text"] if temp_text is None else temp_text
        top_k = d["top_k"] if top_k is None else top_k
        top_k_text = d["top_k_text"] if top_k_text is None else top_k_text
        if not 1 <= top_k <= d["top_k"] or not 1 <= top_k_text <= d["top_k_text"]:
            raise ValueError(f"a slot's top_k must be in [1, {d['top_k']}] and top_k_text in [1, {d['top_k_text']}]")
        if temp < 0 or temp_text < 0:
            raise ValueError("temperatures must be >= 0 (0 is greedy)")
        row = sum(self._open)
        self._swap_rows(self._row_of[free], row)
        params = self._sampling
        params.audio_temperature[row] = temp if use_sampling else 0.0
        params.text_temperature[row] = temp_text if use_sampling else 0.0
        params.audio_top_k[row] = top_k
        params.text_top_k[row] = top_k_text
        params.seed[row] = self.seed + free if seed is None else seed
        self.reset(free)
        self._open[free] = True
        return free

    def close(self, slot: int) -> None:
        """Ends the conversation in `slot`; the slot is free for the next `open()`."""
        if not self._is_slot(slot) or not self._open[slot]:
            raise ValueError(f"slot {slot!r} is not an open conversation (open: {self.open_slots})")
        self._swap_rows(self._row_of[slot], sum(self._open) - 1)
        self._open[slot] = False

    def _is_slot(self, slot) -> bool:
        return isinstance(slot, (int, np.integer)) and not isinstance(slot, bool) and 0 <= slot < self.max_batch

    def _slot_frames(self, frames: dict) -> tuple[int, list[int], list[int]]:
        """Validates {slot: frame} and writes each frame into the host buffer at its slot's row (zeros in the other
        rows of the bucket); returns (the bucket, the slots, their rows)."""
        if not frames:
            raise ValueError("no frames given")
        slots = list(frames)
        for slot in slots:
            if not self._is_slot(slot) or not self._open[slot]:
                raise ValueError(f"slot {slot!r} is not an open conversation (open: {self.open_slots})")
        rows = [self._row_of[slot] for slot in slots]
        bucket = graphs.bucket_for(max(rows) + 1, self.buckets)
        audio, shape = [], (self.frame_size,)
        for slot in slots:
            frame = _host_audio(frames[slot], f"frame of slot {slot}")
            if frame.shape != shape:
                raise ValueError(f"frame of slot {slot} must have shape [{shape[0]}], got {list(frame.shape)}")
            audio.append(frame)
        buffer = self._host.writable_frames(bucket)
        buffer[:] = 0.0
        for row, frame in zip(rows, audio):
            _write_audio(buffer, row, frame)
        finite = np.isfinite(buffer).all(axis=1)
        if not finite.all():
            bad = next(slot for slot, row in zip(slots, rows) if not finite[row])
            raise ValueError(f"frame of slot {bad} contains NaN or Inf samples (or values beyond float32)")
        return bucket, [int(slot) for slot in slots], rows

    def step(self, frames) -> StepOutput:
        """frames: float [max_batch, 1920] (or [1920] when max_batch is 1) to step every slot, or a dict
        {slot: [1920]} of open slots; numpy or torch, on any device.

        Invalid input raises ValueError before any state changes."""
        # No inference_mode here (the reference runner's step has its own): no tensor of a step requires grad, and
        # at an 80 ms cadence entering it costs tens of microseconds of cold host code before the GPU starts.
        if isinstance(frames, dict):
            bucket, slots, rows = self._slot_frames(frames)
        else:
            self._frames(frames)
            bucket, slots, rows = self.max_batch, list(range(self.max_batch)), self._row_of
        if self._graph_reads_host:
            self._host.set_mask(bucket, rows)
            out = self._runner.step_from_host(bucket)
            self._host.sent()
        else:
            out = self._runner.step(*self._host.send(bucket, rows))
        pcm, tokens = self._host.receive(out, bucket, rows)
        text_tokens = torch.from_numpy(tokens[:, 0])
        return StepOutput(pcm=torch.from_numpy(pcm), text_tokens=text_tokens,
                          audio_codes=torch.from_numpy(tokens[:, 1:]),
                          text=self.tokenizer.pieces(text_tokens) if self.tokenizer else None, slots=slots,
                          bucket=bucket)

    def reset(self, slot: int | None = None) -> None:
        """Restarts one conversation (slot index) or all of them (None)."""
        mask = _slot_mask(slot, self.max_batch, self.device)
        if slot is not None:
            mask = _slot_mask(self._row_of[slot], self.max_batch, self.device)
        self._runner.reset(mask)
