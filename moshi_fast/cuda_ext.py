"""The optional CUDA extension moshi_fast._C (csrc/): how it is found or built, its ops, and their torch references
(the sampling op's is the Triton kernel module's `sample_tokens_ref`).

`load()` returns the extension module, or None where it cannot run, and never raises: first the module
built by setup.py (`pip install -e .` on a machine with nvcc and a CUDA build of torch); else, on a CUDA
machine with nvcc and ninja (and MOSHI_FAST_NO_JIT not "1"), a one-time JIT build of csrc/ (a development
install, where csrc/ sits beside the package) into torch's extension cache; else None. Importing the
module registers its ops as torch.ops.moshi_fast.*. The package imports and runs without it: ops.py
calls an extension op only where asked to.

The build flags live here, for setup.py and the JIT build alike.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--threads", "4", "-gencode", "arch=compute_90,code=sm_90"]
"""sm_90 (H100, H200) only: the kernels use mma.sync and 16-byte loads (sm_80 and later), nothing of sm_90a.
No -std: torch's build adds the standard its headers need."""
JIT_NAME = "moshi_fast_C"
"""The JIT build's module name (torch's extension cache keys the build on it)."""
CSRC = Path(__file__).resolve().parent.parent / "csrc"

_UNTRIED = object()
_extension: ModuleType | None | object = _UNTRIED
_unavailable_reason = ""


def load() -> ModuleType | None:
    """The extension module (imported or JIT-built once per process), or None; never raises."""
    global _extension, _unavailable_reason
    if _extension is _UNTRIED:
        _extension, _unavailable_reason = _import_or_build()
    return _extension


def available() -> bool:
    """True when the extension's ops can run (load() found or built it)."""
    return load() is not None


def unavailable_reason() -> str:
    """Why load() returned None ("" when the extension is loaded)."""
    load()
    return _unavailable_reason


def _import_or_build() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(f"{__package__}._C"), ""
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}._C":  # the module exists but one of its imports is missing
            print(f"moshi_fast: ignoring moshi_fast._C, which fails to import: {error}", file=sys.stderr)
    except ImportError as error:  # built, but for another torch or CUDA: try the JIT build
        print(f"moshi_fast: ignoring moshi_fast._C, which fails to import: {error}", file=sys.stderr)
    if os.environ.get("MOSHI_FAST_NO_JIT") == "1":
        return None, "moshi_fast._C is not built and MOSHI_FAST_NO_JIT=1 forbids the JIT build"
    if not torch.cuda.is_available():
        return None, "moshi_fast._C is not built, and without a CUDA device there is nothing to JIT-build for"
    from torch.utils import cpp_extension

    if shutil.which("nvcc") is None and cpp_extension.CUDA_HOME is None:
        return None, "moshi_fast._C is not built and nvcc, needed for the JIT build, is not found"
    if not cpp_extension.is_ninja_available():
        return None, "moshi_fast._C is not built and ninja, needed for the JIT build, is not found"
    sources = sorted(str(path) for path in (*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")))
    if not sources:
        return None, f"moshi_fast._C is not built and no CUDA sources are found in {CSRC} for the JIT build"
    print("moshi_fast: building the CUDA extension from csrc/ (about a minute, once)", file=sys.stderr)
    try:
        module = cpp_extension.load(name=JIT_NAME, sources=sources, extra_cflags=CXX_FLAGS,
                                    extra_cuda_cflags=NVCC_FLAGS)
    except Exception as error:  # a failed build leaves the package usable without the extension
        print(f"moshi_fast: the CUDA extension's JIT build failed: {error}", file=sys.stderr)
        return None, f"the JIT build of moshi_fast._C failed: {error}"
    return module, ""


def _require() -> None:
    if load() is None:
        raise RuntimeError(f"moshi_fast's CUDA extension is not available: {_unavailable_reason}. Build it "
                           "with `pip install -e .` on a machine with nvcc and a CUDA build of torch.")


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, *, norm: tuple[torch.Tensor, float] | None = None,
             gated: bool = False, norm_after: bool = False) -> torch.Tensor:
    """The spec of `gemv`: act(norm(x) @ weight.T) (+ residual) in fp32 on the given values, rounded once to
    out's dtype (x's by default). x [M, K], weight [N, K] ([2N, K] gated: the gate rows, then the up rows),
    residual [M, N] (may be `out`), out [M, N]. norm (norm_weight [K], eps): x is first replaced by
    x * (norm_weight / sqrt(eps + mean(x^2))) in fp32, rounded to x's dtype (the LM's RMSNorm, as
    skinny_linear's); with norm_after the same function rounded elsewhere: x * norm_weight rounded to x's dtype is
    multiplied, and the row's 1 / sqrt(eps + mean(x^2)) scales the product before the gate and the residual.
    gated: out = silu(gate) * up."""
    hidden = x.float()
    scale = None
    if norm is not None:
        norm_weight, eps = norm
        scale = torch.rsqrt(eps + torch.mean(hidden ** 2, dim=-1, keepdim=True))
        if norm_after:
            hidden = (hidden * norm_weight.float()).to(x.dtype).float()
        else:
            hidden = (hidden * (norm_weight.float() * scale)).to(x.dtype).float()
    y = hidden @ weight.float().T
    if norm_after and scale is not None:
        y = y * scale
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is not None:
        y = y + residual.float()
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


def gemv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
         out: torch.Tensor | None = None, warps_per_block: int = 0, *,
         norm: tuple[torch.Tensor, float] | None = None, gated: bool = False,
         norm_after: bool = False, early_residual: bool = False) -> torch.Tensor:
    """out = act(norm(x) @ weight.T) (+ residual) by the extension's weight-streaming GEMV
    (csrc/skinny_gemv_kernel.cuh); the spec is `gemv_ref`.

    x [M, K] with M = 1..GEMV_MAX_ROWS (64; past 8 rows in column groups of 8, see the kernel's doc), weight [N, K]
    (nn.Linear's layout; [2N, K] when gated), residual [M, N] or None (may be `out` itself: an in-place out += x @
    weight.T), out [M, N] (allocated when None): all bf16, contiguous, on one CUDA device; K a multiple of 8. norm
    (norm_weight [K] bf16, eps): RMSNorm x first, fused (each block computes the row scales itself), or with
    norm_after its row scale applied to the product (no pass over x before it; rounded as gemv_ref says). gated: out =
    silu(gate) * up of the weight's two halves, fused. fp32 accumulation, rounded once. Launched with programmatic
    dependent launch where `kernels._utils.pdl` allows it. Floor: the weight's 2 N K bytes, read once. Graph-safe
    with `out` given (the launch allocates nothing and does not synchronise). `warps_per_block`
    (1..gemv_max_warps(M)) overrides how many warps split each 16-row tile's K (0: the default).
    early_residual: each thread of a block requests its first residual element right after the wait for the previous
    kernel, before the products, instead of after the block's reduction (the same sums).
    Raises RuntimeError when the extension is unavailable, ValueError / TypeError on bad arguments."""
    # Imported here: setup.py loads this file on its own, outside the package, for the build flags.
    from .kernels._utils import pdl

    _require()
    if out is None and x.dim() == 2 and weight.dim() == 2:
        columns = weight.shape[0] // 2 if gated else weight.shape[0]
        out = torch.empty(x.shape[0], columns, dtype=x.dtype, device=x.device)
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    _check_gemv(x, weight, residual, out, warps_per_block, norm_weight, gated, norm_after)
    torch.ops.moshi_fast.gemv_bf16(x, weight, residual, out, warps_per_block, norm_weight, float(eps), gated,
                                   pdl(x.device, "gemv", weight.numel() * weight.element_size()), norm_after,
                                   early_residual)
    return out


GEMV_GROUP_ROWS = 8
"""Rows of x in one column group of the GEMV's mma (its B operand's 8 columns)."""
GEMV_MAX_ROWS = 8 * GEMV_GROUP_ROWS
MAX_ROWS = GEMV_GROUP_ROWS
"""The depth step's batch at most: one column group."""
MAX_WARPS = 16


def gemv_max_warps(rows: int) -> int:
    """The most warps a GEMV block may split K across at this many rows: 16 up to two column groups (16 rows), else
    8 (whose blocks may take the registers of 4 and 8 column groups), as csrc/skinny_gemv_kernel.cuh's."""
    return MAX_WARPS if rows <= 2 * GEMV_GROUP_ROWS else MAX_WARPS // 2


SAMPLE_MAX_CANDIDATES = 1024
"""The largest min(max_top_k, V) the extension's sampling kernel serves (its candidate list is in shared memory)."""
SAMPLE_MAX_VOCAB = 1 << 16


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, max_top_k: int,
                  seed: torch.Tensor, counter: torch.Tensor, draw: int, out: torch.Tensor | None = None,
                  warp_kernel: bool = False, vector_loads: bool = False, radix_select: bool = False) -> torch.Tensor:
    """One token per row of logits [B, V] by the extension's sampling kernel (csrc/sample_tokens_kernel.cuh): the
    temperature + top-k exponential race of `moshi_fast.reference.sampling.sample` (the spec; its reference
    implementation is kernels.sample_tokens.sample_tokens_ref), the Triton kernel's tokens, one block per row.

    logits [B, V] bf16 or fp32, any strides, 0 < V < 2^16; temperature [B] fp32 (<= 0: greedy); top_k [B] int64,
    clamped to [1, min(max_top_k, V)]; min(max_top_k, V) <= SAMPLE_MAX_CANDIDATES; seed, counter [B] int64 (read
    on the device: a graph replay after the counter advances draws fresh noise); draw in [0, 2^31); out [B] int64
    (allocated when None). warp_kernel: bf16 rows of 8192 < V <= 32768 with min(max_top_k, V) <= 32 (the text row)
    take the kernel that selects with warp reductions only (the same tokens); vector_loads: rows that are
    contiguous and 16-byte aligned are read in 16-byte pieces, not an entry at a time (the same keys);
    radix_select: the block-wide kernel (every row the warp kernel does not take) finds the k-th largest key by
    radix select, 8 bits a pass, instead of bisection (the same candidates). All off here; `ops.sample_tokens`
    chooses (ops.TEXT_SAMPLER_WARP_KERNEL, ops.SAMPLER_VECTOR_LOADS, ops.SAMPLER_RADIX_SELECT).
    Launched with programmatic dependent launch where `kernels._utils.pdl` allows it. Graph-safe with `out` given.
    Raises RuntimeError when the extension is unavailable, ValueError / TypeError on bad arguments."""
    # Imported here: setup.py loads this file on its own, outside the package, for the build flags.
    from .kernels._utils import pdl

    _require()
    if out is None and logits.dim() == 2:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _check_sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, draw, out)
    if logits.shape[0]:
        torch.ops.moshi_fast.sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, draw, out,
                                           pdl(logits.device, "sample_tokens"), warp_kernel, vector_loads,
                                           radix_select)
    return out


PAGED_HEAD_DIM = 128
"""The head dim the extension's paged attention serves (Helium's)."""
PAGED_GROUP_ROWS = 16
"""Window positions a warp of the paged attention reads per step; runs are whole groups."""
PAGED_MAX_RUN_PAGES = 512
"""Page-table entries a block of the paged attention keeps in shared memory (its run spans chunk / PAGE + 2 at
most)."""
PAGED_MAX_SPLITS = 256
"""The most runs a (slot, head)'s window may be split into."""
PAGED_BLOCKS_PER_SM = 4
"""Blocks of the paged attention an SM holds at once (4 warps and at most 128 registers a thread each)."""
PAGED_MIN_SPLIT_KEYS = 128
"""Fewest window positions per run at a full window that the default split count allows."""


def paged_attention_chunk(live: int, splits: int) -> int:
    """Window positions a run of the paged attention takes when the window is `live` long: cdiv(live, splits)
    rounded up to whole groups (csrc/paged_attention_kernel.cuh's paged_attention_chunk)."""
    return -(-(-(-live // splits)) // PAGED_GROUP_ROWS) * PAGED_GROUP_ROWS


def paged_attention_run_pages(context: int, splits: int, page_size: int) -> int:
    """Page-table entries a run spans at most."""
    return paged_attention_chunk(context, splits) // page_size + 2


def paged_attention_splits(batch: int, heads: int, context: int, device: torch.device | None = None) -> int:
    """The default number of runs the paged attention splits each (slot, head)'s window into on `device` (default:
    the current CUDA device): as many as keep the B H splits blocks within PAGED_BLOCKS_PER_SM an SM, none shorter
    than PAGED_MIN_SPLIT_KEYS at a full window; 1 off CUDA. B = 1, H = 32, context 3000 on 132 SMs: 16."""
    # Imported here: setup.py loads this file on its own, outside the package, for the build flags.
    from .kernels._utils import parallel_sms

    wanted = PAGED_BLOCKS_PER_SM * parallel_sms(device) // max(1, batch * heads)
    return max(1, min(wanted, -(-context // PAGED_MIN_SPLIT_KEYS), PAGED_MAX_SPLITS))


def paged_attention_workspace_size(batch: int, heads: int, context: int, splits: int = 0,
                                   device: torch.device | None = None) -> tuple[int, int]:
    """(partial floats, counters) of the SplitWorkspace that `paged_attention` needs with `splits` runs (0: the
    default on `device`); (0, 0) unsplit. The layout is kernels/paged_attention.py's."""
    splits = splits or paged_attention_splits(batch, heads, context, device)
    if splits == 1:
        return 0, 0
    return batch * heads * splits * (PAGED_HEAD_DIM + 2), batch * heads


def paged_attention(qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
                    positions: torch.Tensor, exec_mask: torch.Tensor, context: int, max_period: float,
                    out: torch.Tensor | None = None, workspace=None, splits: int = 0,
                    reads_before_wait: bool = False) -> torch.Tensor:
    """Helium's decode attention over the paged KV cache by the extension's kernel
    (csrc/paged_attention_kernel.cuh): for each running slot's new token, RoPE, the write of its key and value into
    their page, and attention over its live window, in one launch; the operands, semantics and split workspace of
    kernels.paged_attention.paged_attention, whose paged_attention_ref is the spec (the results agree with the Triton
    kernel's to fp32 rounding, not bit for bit: the sums run in another order).

    qkv [B, 3 H 128] bf16 (rows 16-byte aligned); k_pool, v_pool [P, H, PAGE, 128] bf16, one layout, PAGE a power of
    two; page_table [S, N] int32 with N PAGE >= context; positions [S] int32 or int64 and exec_mask [S] bool,
    contiguous, S >= B; out [B, H 128] bf16 (allocated when None). workspace: a kernels._utils.SplitWorkspace of at
    least `paged_attention_workspace_size` (allocated when None and the window is split). splits: runs per (slot,
    head) (0: `paged_attention_splits`). Floor: the live keys and values, read once (49 MB a slot and layer at
    Helium's full window of 3000). Launched with programmatic dependent launch where `kernels._utils.pdl` allows it;
    reads_before_wait: then the window's first keys and values (and the mask, positions and page table) are read
    before the kernel waits for the previous one, which must write none of them and let this kernel start only after
    its own wait (Helium's qkv product does both). Graph-safe with `out` and `workspace` given. Raises RuntimeError
    when the extension is unavailable, ValueError / TypeError on bad arguments."""
    _require()
    splits = splits or paged_attention_splits(qkv.shape[0], k_pool.shape[1], context, qkv.device)
    _check_paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, out, splits)
    return launch_paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, max_period, out,
                                  workspace, splits, reads_before_wait)


def launch_paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context: int, max_period: float,
                           out: torch.Tensor | None = None, workspace=None, splits: int = 0,
                           reads_before_wait: bool = False) -> torch.Tensor:
    """`paged_attention` for operands that its checks (or `paged_attention_supported`) have passed, with the extension
    loaded: the launch without the Python-side checks (the workspace's size and the op's own still run)."""
    # Imported here: setup.py loads this file on its own, outside the package, for the build flags.
    from .kernels._utils import pdl, split_buffers

    batch, heads = qkv.shape[0], k_pool.shape[1]
    if out is None:
        out = torch.empty(batch, heads * PAGED_HEAD_DIM, dtype=qkv.dtype, device=qkv.device)
    splits = splits or paged_attention_splits(batch, heads, context, qkv.device)
    partials, counters = split_buffers(workspace, *paged_attention_workspace_size(batch, heads, context, splits),
                                       splits, out)
    torch.ops.moshi_fast.paged_attention_bf16(qkv, k_pool, v_pool, page_table, positions, exec_mask, context,
                                              float(max_period), out, partials, counters, splits,
                                              pdl(qkv.device, "paged_attention"), reads_before_wait)
    return out


def paged_attention_supported(qkv, k_pool, v_pool, page_table, positions, exec_mask, context: int,
                              out: torch.Tensor | None) -> bool:
    """Whether `paged_attention` takes these operands with its default split count (its argument checks pass);
    whether the extension is available is not checked here."""
    try:
        splits = paged_attention_splits(qkv.shape[0], k_pool.shape[1], context, qkv.device) if qkv.is_cuda else 1
        _check_paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, out, splits)
    except (ValueError, TypeError, IndexError):
        return False
    return True


def _check_paged_attention(qkv, k_pool, v_pool, page_table, positions, exec_mask, context, out, splits) -> None:
    """The op's argument checks, made here first (see _check_gemv); out may be None (allocated later)."""
    if not qkv.is_cuda:
        raise ValueError(f"paged_attention runs on CUDA tensors; qkv is on {qkv.device}")
    if qkv.dtype != torch.bfloat16:
        raise TypeError(f"paged_attention: qkv must be bfloat16, got {qkv.dtype}")
    if k_pool.dim() != 4 or k_pool.shape[3] != PAGED_HEAD_DIM:
        raise ValueError(f"paged_attention: k_pool must be [P, H, PAGE, {PAGED_HEAD_DIM}], got {list(k_pool.shape)}")
    _, heads, page_size, _ = k_pool.shape
    width = 3 * heads * PAGED_HEAD_DIM
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"paged_attention: qkv must be [B, {width}] with unit stride in its last dim, got "
                         f"{list(qkv.shape)}")
    if qkv.data_ptr() % 16 or qkv.stride(0) % 8:
        raise ValueError("paged_attention: qkv's rows must be 16-byte aligned")
    batch = qkv.shape[0]
    named = {"k_pool": (k_pool, torch.bfloat16), "v_pool": (v_pool, torch.bfloat16),
             "page_table": (page_table, torch.int32), "exec_mask": (exec_mask, torch.bool)}
    if out is not None:
        named["out"] = (out, torch.bfloat16)
    _check_devices_and_dtypes("paged_attention", "qkv's", qkv.device, named)
    if v_pool.shape != k_pool.shape or v_pool.stride() != k_pool.stride():
        raise ValueError("paged_attention: k_pool and v_pool must share a shape and layout")
    if (k_pool.stride(3) != 1 or any(stride % 8 for stride in k_pool.stride()[:3])
            or k_pool.data_ptr() % 16 or v_pool.data_ptr() % 16):
        raise ValueError("paged_attention: the pools' rows must be 16-byte aligned with unit stride in the head dim")
    if page_size & (page_size - 1):
        raise ValueError(f"paged_attention: the page size must be a power of two, got {page_size}")
    if page_table.dim() != 2 or page_table.stride(1) != 1:
        raise ValueError("paged_attention: page_table must be [S, N] with unit stride in its last dim")
    if not 0 < context < 2 ** 30 or page_table.shape[1] * page_size < context:
        raise ValueError(f"paged_attention: a ring of {page_table.shape[1]} pages of {page_size} cannot hold a "
                         f"window of {context}")
    if positions.device != qkv.device or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError("paged_attention: positions must be int32 or int64 on qkv's device")
    if positions.dim() != 1 or positions.stride(0) != 1 or exec_mask.dim() != 1 or exec_mask.stride(0) != 1:
        raise ValueError("paged_attention: positions and exec_mask must be contiguous vectors")
    if min(page_table.shape[0], positions.shape[0], exec_mask.shape[0]) < batch:
        raise ValueError(f"paged_attention: page_table, positions and exec_mask must cover the {batch} slots of qkv")
    if out is not None and (tuple(out.shape) != (batch, heads * PAGED_HEAD_DIM) or out.stride(1) != 1):
        raise ValueError(f"paged_attention: out must be [{batch}, {heads * PAGED_HEAD_DIM}] with unit stride in its "
                         f"last dim, got {list(out.shape)}")
    if not 1 <= splits <= PAGED_MAX_SPLITS:
        raise ValueError(f"paged_attention: splits must be in 1..{PAGED_MAX_SPLITS}, got {splits}")
    if batch * heads >= 2 ** 16:
        raise ValueError(f"paged_attention: at most 65535 (slot, head) pairs, got {batch * heads}")
    if paged_attention_run_pages(context, splits, page_size) > PAGED_MAX_RUN_PAGES:
        raise ValueError(f"paged_attention: a run of the window spans more than {PAGED_MAX_RUN_PAGES} pages; use "
                         "more splits or larger pages")


DEPTH_MAX_DIM = 1024
"""The widest D the extension's depth step serves (every row's attention output is kept in shared memory)."""
DEPTH_MAX_HIDDEN = 3072
"""The widest Hd it serves (a tile's activation pieces are held in registers)."""
DEPTH_HEAD_DIM = 64
DEPTH_MAX_STEPS = 16
DEPTH_MIN_STAGES, DEPTH_MAX_STAGES, DEPTH_DEFAULT_STAGES = 2, 6, 6
"""Weight chunks in flight per block of the depth step: the range it takes and its default."""
DEPTH_REFILLS = {"chunk": 0, "arrivals": 1, "inputs": 2}
"""When the depth step's warps refill their weight slots (`depth_step`'s refills) -> the kernel's code."""


def depth_step(x: torch.Tensor, previous: torch.Tensor, embed_table: torch.Tensor, embed_row_offset: torch.Tensor,
               norm1: torch.Tensor, qkv: torch.Tensor, out_proj: torch.Tensor, norm2: torch.Tensor,
               gate_up: torch.Tensor, down: torch.Tensor, head: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, step: int, eps: float, logits_out: torch.Tensor, scratch,
               trace: torch.Tensor | None = None, stages: int = 0, refills: str = "chunk") -> torch.Tensor:
    """One codebook step of the depth transformer in one persistent launch by the extension's kernel
    (csrc/depth_step_kernel.cuh): the operands and semantics of kernels/depth_step.py's `depth_step` (its
    `depth_step_ref` is the spec), bf16 only, B <= 8, heads of 64, D <= DEPTH_MAX_DIM, Hd <= DEPTH_MAX_HIDDEN, at most
    DEPTH_MAX_STEPS steps, `previous` and `embed_row_offset` int64. scratch: kernels.depth_step.DepthStepScratch
    (its qkv and hidden buffers and its grid barrier's `arrivals`; not its attention buffer or counters). trace:
    None, or int64 [depth_step_blocks(device), depth_step_trace_slots(L)], which receives the launch's timeline
    (global timer, ns: each block's start, its start after the wait for the previous kernel, then per product
    phase its start, its input rows ready, its end; bench/trace_depth_step.py reads it). stages: weight chunks
    (16 rows x 1024 columns) in flight per block, DEPTH_MIN_STAGES..DEPTH_MAX_STAGES, or 0 for
    DEPTH_DEFAULT_STAGES. refills (a key of DEPTH_REFILLS): when the warps refill the weight slots they have
    consumed: "chunk" right after each chunk; "arrivals" warp 0 (whose thread 0 arrives at the kernel's grid
    barriers) only after each arrival, so that none of its copies is in flight at the arrival's release fence;
    "inputs" every warp once the phase's input rows are read, so that no refill is queued ahead of those reads.
    Launched with programmatic dependent launch where `kernels._utils.pdl` allows it. Graph-safe. Returns
    logits_out. Raises RuntimeError when the extension is unavailable, ValueError / TypeError on bad arguments."""
    _require()
    _check_depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head,
                      k_cache, v_cache, step, logits_out, scratch)
    if refills not in DEPTH_REFILLS:
        raise ValueError(f"depth_step_bf16: refills must be one of {sorted(DEPTH_REFILLS)}, got {refills!r}")
    if stages != 0 and not DEPTH_MIN_STAGES <= stages <= DEPTH_MAX_STAGES:
        raise ValueError(f"depth_step_bf16: stages must be 0 or {DEPTH_MIN_STAGES} to {DEPTH_MAX_STAGES}, "
                         f"got {stages}")
    return launch_depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down,
                             head, k_cache, v_cache, step, eps, logits_out, scratch, trace, stages,
                             DEPTH_REFILLS[refills])


def depth_step_blocks(device: torch.device | str | int) -> int:
    """Blocks of a `depth_step` launch on `device`: one per SM (the kernel's barriers need every block resident)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def depth_step_trace_slots(layers: int) -> int:
    """Timeline entries of a block in a `depth_step` of `layers` layers: 2, then 3 for each of its 4 L + 1 product
    phases (csrc/depth_step_kernel.cuh)."""
    return 2 + 3 * (4 * layers + 1)


def launch_depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head,
                      k_cache, v_cache, step, eps, logits_out, scratch, trace=None, stages=0,
                      refills=0) -> torch.Tensor:
    """`depth_step` for operands that `depth_step_supported` has passed, with the extension loaded: the launch
    without the Python-side checks (the op's own still run); refills is a DEPTH_REFILLS value."""
    # Imported here: setup.py loads this file on its own, outside the package, for the build flags.
    from .kernels._utils import pdl

    torch.ops.moshi_fast.depth_step_bf16(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2,
                                         gate_up, down, head, k_cache, v_cache, step, float(eps), logits_out,
                                         scratch.qkv, scratch.hidden, scratch.arrivals, trace, stages, refills,
                                         pdl(x.device, "depth_step"))
    return logits_out


def depth_step_supported(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down,
                         head, k_cache, v_cache, step, logits_out, scratch) -> bool:
    """Whether `depth_step` takes these operands (its argument checks pass); whether the extension is
    available is not checked here."""
    try:
        _check_depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down,
                          head, k_cache, v_cache, step, logits_out, scratch)
    except (ValueError, TypeError):
        return False
    return True


def _check_depth_step(x, previous, embed_table, embed_row_offset, norm1, qkv, out_proj, norm2, gate_up, down, head,
                      k_cache, v_cache, step, logits_out, scratch) -> None:
    """The op's argument checks, made here first (see _check_gemv)."""
    if x.dim() != 2 or not x.is_cuda:
        raise ValueError(f"depth_step_bf16 runs on a CUDA x [B, D], got {list(x.shape)} on {x.device}")
    rows, dim = x.shape
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"depth_step_bf16: x must have 1 to {MAX_ROWS} rows, got {rows}")
    if dim % DEPTH_HEAD_DIM or dim > DEPTH_MAX_DIM:
        raise ValueError(f"depth_step_bf16: D must be a multiple of {DEPTH_HEAD_DIM} and at most {DEPTH_MAX_DIM}, "
                         f"got {dim}")
    if gate_up.dim() != 3 or gate_up.shape[1] % 2:
        raise ValueError(f"depth_step_bf16: gate_up must be [L, 2 Hd, D], got {list(gate_up.shape)}")
    layers, hidden = norm1.shape[0], gate_up.shape[1] // 2
    if hidden % 8 or hidden > DEPTH_MAX_HIDDEN:
        raise ValueError(f"depth_step_bf16: Hd must be a multiple of 8 and at most {DEPTH_MAX_HIDDEN}, got {hidden}")
    heads = dim // DEPTH_HEAD_DIM
    steps = k_cache.shape[3] if k_cache.dim() == 5 else 0
    expected = {
        "x": (x, torch.bfloat16, (rows, dim)), "previous": (previous, torch.int64, (rows,)),
        "embed_table": (embed_table, torch.bfloat16, (embed_table.shape[0], dim)),
        "embed_row_offset": (embed_row_offset, torch.int64, tuple(embed_row_offset.shape)),
        "norm1": (norm1, torch.bfloat16, (layers, dim)), "norm2": (norm2, torch.bfloat16, (layers, dim)),
        "qkv": (qkv, torch.bfloat16, (layers, 3 * dim, dim)), "out_proj": (out_proj, torch.bfloat16, (layers, dim, dim)),
        "gate_up": (gate_up, torch.bfloat16, (layers, 2 * hidden, dim)),
        "down": (down, torch.bfloat16, (layers, dim, hidden)), "head": (head, torch.bfloat16, (head.shape[0], dim)),
        "k_cache": (k_cache, torch.bfloat16, (layers, rows, heads, steps, DEPTH_HEAD_DIM)),
        "v_cache": (v_cache, torch.bfloat16, (layers, rows, heads, steps, DEPTH_HEAD_DIM)),
        "logits_out": (logits_out, torch.bfloat16, (rows, head.shape[0])),
        "scratch.qkv": (scratch.qkv, torch.bfloat16, (rows, 3 * dim)),
        "scratch.hidden": (scratch.hidden, torch.bfloat16, (rows, hidden)),
        "scratch.arrivals": (scratch.arrivals, torch.int64, (1,)),
    }
    for name, (tensor, dtype, shape) in expected.items():
        if tensor.device != x.device:
            raise ValueError(f"depth_step_bf16: {name} must be on x's device {x.device}, got {tensor.device}")
        if tensor.dtype != dtype:
            raise TypeError(f"depth_step_bf16: {name} must be {dtype}, got {tensor.dtype}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"depth_step_bf16: {name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if embed_row_offset.numel() != 1:
        raise ValueError("depth_step_bf16: embed_row_offset must hold one value")
    if layers < 1 or head.shape[0] < 1:
        raise ValueError("depth_step_bf16: need at least one layer and one head row")
    if not (steps <= DEPTH_MAX_STEPS and 0 <= step < steps):
        raise ValueError(f"depth_step_bf16: need 0 <= step < S <= {DEPTH_MAX_STEPS}, got step {step} and S {steps}")
    # Rows read in 16-byte pieces: unit last stride, row (and layer) strides a multiple of 8 elements, aligned.
    for name in ("x", "norm1", "norm2", "qkv", "out_proj", "gate_up", "down"):
        tensor = expected[name][0]
        if tensor.stride(-1) != 1 or any(s % 8 for s in tensor.stride()[:-1]) or tensor.data_ptr() % 16:
            raise ValueError(f"depth_step_bf16: {name} must have unit last stride, other strides multiples of 8 "
                             f"and a 16-byte aligned start, got strides {tensor.stride()}")
    for name in ("qkv", "out_proj", "gate_up", "down"):
        tensor = expected[name][0]
        if tensor.stride(1) != tensor.shape[2]:
            raise ValueError(f"depth_step_bf16: {name}'s rows must be contiguous, got strides {tensor.stride()}")
    if norm1.stride() != norm2.stride():
        raise ValueError("depth_step_bf16: norm1 and norm2 must have the same strides")
    for name in ("head", "embed_table", "previous", "k_cache", "v_cache", "scratch.qkv", "scratch.hidden"):
        if not expected[name][0].is_contiguous():
            raise ValueError(f"depth_step_bf16: {name} must be contiguous")
    for name in ("head", "embed_table", "scratch.qkv", "scratch.hidden"):
        if expected[name][0].data_ptr() % 16:
            raise ValueError(f"depth_step_bf16: {name} must start 16-byte aligned (it is read in 16-byte pieces)")
    if logits_out.stride(-1) != 1:
        raise ValueError(f"depth_step_bf16: logits_out must have unit last stride, got {logits_out.stride()}")


def sample_tokens_supported(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, max_top_k: int,
                            seed: torch.Tensor, counter: torch.Tensor, out: torch.Tensor | None) -> bool:
    """Whether `sample_tokens` takes these operands (its argument checks pass); whether the extension is
    available is not checked here."""
    try:
        _check_sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, 0, out)
    except (ValueError, TypeError):
        return False
    return True


def _check_sample_tokens(logits, temperature, top_k, max_top_k, seed, counter, draw, out) -> None:
    """The op's argument checks, made here first (see _check_gemv); out may be None (allocated later)."""
    if logits.dim() != 2:
        raise ValueError(f"sample_tokens: logits must be [B, V], got {list(logits.shape)}")
    if not logits.is_cuda:
        raise ValueError(f"sample_tokens runs on CUDA tensors; logits are on {logits.device}")
    if logits.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"sample_tokens: logits must be bfloat16 or float32, got {logits.dtype}")
    batch, vocab = logits.shape
    if not 0 < vocab < SAMPLE_MAX_VOCAB:
        raise ValueError(f"sample_tokens: need 0 < V < {SAMPLE_MAX_VOCAB}, got {vocab}")
    if max_top_k < 1 or min(max_top_k, vocab) > SAMPLE_MAX_CANDIDATES:
        raise ValueError(f"sample_tokens: need 1 <= max_top_k and min(max_top_k, V) <= {SAMPLE_MAX_CANDIDATES}, "
                         f"got max_top_k {max_top_k}")
    if not 0 <= draw < 2 ** 31:
        raise ValueError(f"sample_tokens: draw must be in [0, 2**31), got {draw}")
    vectors = {"temperature": (temperature, torch.float32), "top_k": (top_k, torch.int64),
               "seed": (seed, torch.int64), "counter": (counter, torch.int64)}
    if out is not None:
        vectors["out"] = (out, torch.int64)
    _check_devices_and_dtypes("sample_tokens", "the logits'", logits.device, vectors)
    for name, (tensor, _) in vectors.items():
        if tuple(tensor.shape) != (batch,):
            raise ValueError(f"sample_tokens: {name} must be [{batch}], got {list(tensor.shape)}")


def _check_devices_and_dtypes(op: str, owner: str, device: torch.device,
                              named: dict[str, tuple[torch.Tensor, torch.dtype]]) -> None:
    """ValueError unless every named tensor is on `device` (the `owner` operand's), TypeError unless it has its
    dtype."""
    for name, (tensor, dtype) in named.items():
        if tensor.device != device:
            raise ValueError(f"{op}: {name} must be on {owner} device {device}, got {tensor.device}")
        if tensor.dtype != dtype:
            raise TypeError(f"{op}: {name} must be {dtype}, got {tensor.dtype}")


def _check_gemv(x, weight, residual, out, warps_per_block, norm_weight=None, gated=False, norm_after=False) -> None:
    """The op's argument checks, made here first: on an H200 (torch 2.11) one of the op's own C++ checks
    crashed the process instead of raising (a c10::ValueError thrown before any launch, in a test of bad
    arguments; cause not established), so no invalid call reaches it."""
    # Imported here: setup.py loads this file on its own, outside the package, for the build flags.
    from .kernels._utils import spans_overlap

    if all(t.device.type == "cpu" for t in (x, weight, out) if t is not None):
        raise NotImplementedError("gemv_bf16 has no CPU implementation: it runs on CUDA tensors")
    if norm_after and norm_weight is None:
        raise ValueError("gemv_bf16: norm_after needs a norm")
    if not x.is_cuda:
        raise ValueError(f"gemv_bf16 runs on CUDA tensors; x is on {x.device}")
    named = {"x": x, "weight": weight, "out": out}
    if residual is not None:
        named["residual"] = residual
    if norm_weight is not None:
        named["norm_weight"] = norm_weight
    for name, tensor in named.items():
        if tensor.device != x.device:
            raise ValueError(f"gemv_bf16: {name} must be on x's device {x.device}, got {tensor.device}")
        if tensor.dtype != torch.bfloat16:
            raise TypeError(f"gemv_bf16: {name} must be bfloat16, got {tensor.dtype}")
        dims = 1 if name == "norm_weight" else 2
        if tensor.dim() != dims:
            raise ValueError(f"gemv_bf16: {name} must be {dims}-D, got shape {list(tensor.shape)}")
        if not tensor.is_contiguous():
            raise ValueError(f"gemv_bf16: {name} must be contiguous, got strides {tensor.stride()}")
    rows, k = x.shape
    if gated and weight.shape[0] % 2:
        raise ValueError(f"gemv_bf16: a gated weight has an even number of rows, got {weight.shape[0]}")
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"gemv_bf16: norm_weight must have shape [{k}], got {list(norm_weight.shape)}")
    if not 1 <= rows <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv_bf16: x must have 1 to {GEMV_MAX_ROWS} rows, got {rows}")
    if weight.shape[1] != k:
        raise ValueError(f"gemv_bf16: x {list(x.shape)} and weight {list(weight.shape)} do not match along K")
    if k <= 0 or k % 8:
        raise ValueError(f"gemv_bf16: K must be a positive multiple of 8, got {k}")
    for name in ("out", "residual"):
        if name in named and tuple(named[name].shape) != (rows, n):
            raise ValueError(f"gemv_bf16: {name} must have shape [{rows}, {n}], got {list(named[name].shape)}")
    read = [name for name in ("x", "weight", "norm_weight") if name in named]
    for name in read:
        if named[name].data_ptr() % 16:
            raise ValueError(f"gemv_bf16: {name} must start 16-byte aligned (it is read in 16-byte pieces)")
    for name in read:
        if spans_overlap(out, named[name]):
            raise ValueError(f"gemv_bf16: out overlaps {name}")
    if residual is not None and spans_overlap(residual, out) and not (
            residual.data_ptr() == out.data_ptr() and residual.stride() == out.stride()):
        raise ValueError("gemv_bf16: residual overlaps out without being out itself")
    if not 0 <= warps_per_block <= gemv_max_warps(rows):
        raise ValueError(f"gemv_bf16: warps_per_block must be 0 (the default) or 1 to {gemv_max_warps(rows)} at "
                         f"{rows} rows, got {warps_per_block}")

