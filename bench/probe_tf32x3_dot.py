"""Probe: Triton's tf32x3 dot against three explicit tf32 dots with a pre-split second operand, one tf32 pass and
cuBLAS's fp32 GEMM, on plain GEMMs the size of the codec's B = 64 convs (their implicit GEMMs without the gathers).

    python bench/probe_tf32x3_dot.py        # OUT=dir also writes dir/tf32x3_probe.json

What it answers: how fast a tf32x3 product of these sizes can run in Triton at all, so that the conv kernels' own
times (bench_conv1d_stream.py, bench_conv_transpose1d_stream.py) can be read against it."""
import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _tf32_round(x):
    # Round to the nearest tf32 (10 mantissa bits), ties away from zero, on the bits (as cvt.rna.tf32.f32).
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _tile_offsets(BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """This program's output rows and columns, and the reduction offsets of one step."""
    return (tl.program_id(0) * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN),
            tl.arange(0, BK))


@triton.jit
def _load_b(b_ptr, k0, ok, on, N):
    """Rows k0 + ok and columns on of the row-major [K, N] operand b."""
    return tl.load(b_ptr + (k0 + ok)[:, None] * N + on[None, :], mask=(on < N)[None, :], other=0.0)


@triton.jit
def mm_builtin(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               PREC: tl.constexpr):
    """c = a @ b in one tl.dot a step at input precision PREC ("tf32x3" or "tf32")."""
    om, on, ok = _tile_offsets(BM, BN, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + om[:, None] * K + (k0 + ok)[None, :], mask=(om < M)[:, None], other=0.0)
        acc = tl.dot(a, _load_b(b_ptr, k0, ok, on, N), acc, input_precision=PREC)
    tl.store(c_ptr + om[:, None] * N + on[None, :], acc, mask=(om < M)[:, None] & (on < N)[None, :])


@triton.jit
def mm_presplit(a_ptr, bhi_ptr, blo_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c = a @ (b_hi + b_lo) by three tf32 dots a step, b given as its tf32 parts (split_tf32), a split here."""
    om, on, ok = _tile_offsets(BM, BN, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + om[:, None] * K + (k0 + ok)[None, :], mask=(om < M)[:, None], other=0.0)
        b_hi = _load_b(bhi_ptr, k0, ok, on, N)
        b_lo = _load_b(blo_ptr, k0, ok, on, N)
        a_hi = _tf32_round(a)
        a_lo = a - a_hi
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    tl.store(c_ptr + om[:, None] * N + on[None, :], acc, mask=(om < M)[:, None] & (on < N)[None, :])


def split_tf32(b):
    hi = (b.view(torch.int32) + 0x1000 & ~0x1FFF).view(torch.float32)  # round to nearest (ties away) at 10 bits
    return hi.contiguous(), (b - hi).contiguous()


def run(a, b, variant, BM, BN, BK, warps, stages, parts=None):
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, device=a.device)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    if variant in ("builtin", "tf32_one_pass"):
        prec = "tf32x3" if variant == "builtin" else "tf32"
        fn = lambda: mm_builtin[grid](a, b, c, M, N, K, BM, BN, BK, prec, num_warps=warps, num_stages=stages)
    elif variant == "cublas_fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        fn = lambda: torch.matmul(a, b, out=c)
    else:
        hi, lo = parts
        fn = lambda: mm_presplit[grid](a, hi, lo, c, M, N, K, BM, BN, BK, num_warps=warps, num_stages=stages)
    return fn, c


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [("dec.up2 (640 x 512 x 6208)", 6208, 640, 512), ("enc.down1 (256 x 1280 x 6144)", 6144, 256, 1280),
              ("res.conv1 64>32 k3 (32 x 192 x 122880)", 122880, 32, 192),
              ("dec.up3 (256 x 256 x 30784)", 30784, 256, 256)]
    if dev == "cpu":
        shapes = [("tiny", 40, 24, 48)]
    configs = [(128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 2), (64, 64, 32, 4, 3), (128, 32, 32, 4, 3),
               (256, 64, 32, 8, 3), (128, 64, 16, 4, 4)]
    if dev == "cpu":
        configs = [(16, 16, 16, 4, 1)]
    rows = []
    for name, M, N, K in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(M, K, generator=g).to(dev)
        b = (torch.randn(K, N, generator=g) / K ** 0.5).to(dev)
        ref = (a.double() @ b.double())
        parts = split_tf32(b)
        for cfg in configs:
            BM, BN, BK, warps, stages = cfg
            N_eff = min(BN, N)
            variants = ["builtin", "presplit", "tf32_one_pass"] + (["cublas_fp32"] if cfg == configs[0] else [])
            for variant in variants:
                try:
                    fn, c = run(a, b, variant, BM, N_eff if BN > N else BN, BK, warps, stages, parts)
                    fn()
                    err = ((c.double() - ref).abs().max() / ref.abs().max()).item()
                    if dev == "cuda":
                        torch.cuda.synchronize()
                        ms = triton.testing.do_bench(fn, warmup=20, rep=100)
                    else:
                        ms = float("nan")
                except Exception as e:  # noqa: BLE001 - a probe: record compile failures and go on
                    err, ms = repr(e)[:200], None
                flops = 2 * M * N * K
                row = dict(shape=name, M=M, N=N, K=K, cfg=cfg, variant=variant, us=None if ms is None else ms * 1e3,
                           tflops_fp32eq=None if not ms else flops / ms / 1e9, max_rel_err=err)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = os.environ.get("OUT")
    if out:
        info = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                    triton=triton.__version__, git=os.environ.get("GIT_SHA"), rows=rows)
        json.dump(info, open(os.path.join(out, "tf32x3_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
