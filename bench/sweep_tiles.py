"""Times every kernel's candidate tilings at the shapes Mimi runs them at, beside the default plan.

    python bench/sweep_tiles.py --batches 1,8,64 --ops conv1d,convtr,ring,linear --json sweep.json
    python bench/sweep_tiles.py --table sweep.json [later.json ...]    (no GPU needed; oldest first)

The first form times, for each op, shape and batch, the default plan and its neighbours (each
kernel's `*_candidate_tiles`); each time is one call in a CUDA graph of back-to-back calls
(bench/_harness.graph_time), real config, random weights. The second writes kernels/tuned_tiles.json
from such sweeps: per op, shape and batch the fastest plan, where it beat the heuristics' own plan by
more than NOISE (else the heuristics' plan), which the kernels then use by default (kernels/tuned.py).
A kernel alone is not the kernel in the codec's graph (the one before it, programmatic dependent launch, what L2
holds): keep a copy of the table before writing the new one and time both in one process with
`bench_mimi.py --compare-table OLD.json` (bench_frame.py takes the same option).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import device_info, graph_time  # noqa: E402
from moshi_fast import MimiCodec, moshiko, ops  # noqa: E402
from moshi_fast.fast.mimi import FastMimi  # noqa: E402
from moshi_fast.kernels import conv1d_stream as conv1d_module  # noqa: E402
from moshi_fast.kernels import conv_transpose1d_stream as convtr_module  # noqa: E402
from moshi_fast.cache import PagedKVCache  # noqa: E402
from moshi_fast.config import LMConfig  # noqa: E402
from moshi_fast.kernels import paged_attention as paged_module  # noqa: E402
from moshi_fast.kernels import ring_attention as ring_module  # noqa: E402
from moshi_fast.kernels import skinny_linear as linear_module  # noqa: E402
from moshi_fast.kernels import tuned  # noqa: E402
from moshi_fast.kernels._utils import SplitWorkspace  # noqa: E402
from moshi_fast.reference.mimi import CausalConv1d, CausalConvTranspose1d  # noqa: E402

WORKSPACE_FLOATS = 1 << 26
NOISE = 0.03
"""A candidate replaces the heuristics' plan in the table only if it was this much faster."""
H100_H200_SMS = 132


def _time_candidates(call, candidates) -> list[dict]:
    """[{tiles, us}] for the default plan (tiles None) and each candidate; failures are recorded."""
    rows = []
    for tiles in [None, *candidates]:
        try:
            us = graph_time(lambda: call(tiles), iters=20, reps=7) * 1e6
        except Exception as error:  # a candidate the compiler rejects (e.g. out of shared memory)
            rows.append({"tiles": repr(tiles), "error": f"{type(error).__name__}: {error}"[:200]})
            continue
        rows.append({"tiles": "default" if tiles is None else repr(tiles), "us": us})
    return rows


def _conv_cases(model: FastMimi, batch: int, device, workspace):
    lengths = model.streaming_input_lengths()
    modules = dict(model.named_modules())
    for name, t_in in lengths.items():
        module = modules[name]
        if isinstance(module, CausalConv1d):
            c_out, c_in, kernel = module.weight.shape
            x = torch.randn(batch, c_in, t_in, device=device)
            state = torch.randn(2, batch, c_in, module.history, device=device)
            frame = torch.arange(batch, dtype=torch.int32, device=device)
            out = torch.empty(batch, c_out, t_in // module.stride, device=device)
            residual = torch.randn_like(out) if name.endswith("res.conv2") else None

            def call(tiles, x=x, state=state, frame=frame, module=module, out=out, residual=residual):
                conv1d_module.conv1d_stream(x, state, frame, module.weight, module.bias, module.stride, True, residual,
                                            module.replicate, out=out, workspace=workspace, tiles=tiles)

            candidates = conv1d_module.conv1d_stream_candidate_tiles(batch, c_in, c_out, kernel, module.stride, t_in)
            yield "conv1d", name, call, candidates
        elif isinstance(module, CausalConvTranspose1d):
            c_in = module.weight.shape[0]
            groups = module.groups
            c_out = module.out_channels
            kernel = module.weight.shape[-1]
            x = torch.randn(batch, c_in, t_in, device=device)
            partial = torch.randn(2, batch, c_out, module.overlap, device=device)
            frame = torch.arange(batch, dtype=torch.int32, device=device)
            out = torch.empty(batch, c_out, t_in * module.stride, device=device)
            packed = convtr_module.pack_conv_transpose_weight(module.weight, module.stride) if groups == 1 else None

            def call(tiles, x=x, partial=partial, frame=frame, module=module, out=out, packed=packed, groups=groups):
                convtr_module.conv_transpose1d_stream(x, partial, frame, module.weight, module.bias, module.stride,
                                                      groups, groups == 1, out=out, packed_weight=packed,
                                                      workspace=workspace, tiles=tiles)

            candidates = convtr_module.conv_transpose1d_stream_candidate_tiles(batch, c_in, c_out, kernel,
                                                                              module.stride, t_in, groups)
            yield "convtr", name, call, candidates


def _ring_cases(model: FastMimi, batch: int, device, workspace):
    c = model.config
    qkv = torch.randn(batch, 2, 3 * c.dimension, device=device)
    ring_k = torch.randn(batch, c.num_heads, c.context, c.head_dim, device=device)
    ring_v = torch.randn_like(ring_k)
    frame = torch.full((batch,), 1000, dtype=torch.int32, device=device)
    out = torch.empty(batch, 2, c.dimension, device=device)

    def call(tiles):
        ring_module.ring_attention(qkv, ring_k, ring_v, frame, c.max_period, out=out, workspace=workspace,
                                   tiles=tiles)

    candidates = ring_module.ring_attention_candidate_tiles(batch, c.num_heads, 2, c.head_dim, c.context)
    yield "ring", "ring_attention", call, candidates


LM_LINEARS = {  # name: (N, K, RMSNorm on the input, residual add, SiLU gate); the language model's decode linears
    "qkv+rms": (12288, 4096, True, False, False),
    "out+residual": (4096, 4096, False, True, False),
    "down+residual": (4096, 11264, False, True, False),
    "text_head+rms": (32000, 4096, True, False, False),
    # The depth transformer's, per codebook step (N output columns; the gated input's weight has 2N rows).
    "dep.qkv+rms": (3072, 1024, True, False, False),
    "dep.out+residual": (1024, 1024, False, True, False),
    "dep.gate_up+rms+silu": (2816, 1024, True, False, True),
    "dep.down+residual": (1024, 2816, False, True, False),
    "dep.head": (2048, 1024, False, False, False),
}
COLD_WEIGHT_BYTES = 256 << 20
"""Weight copies the LM cases cycle through, in all: as in the frame, where no product reads a weight that a
kernel of the frame read before, each call's weight is cold in L2 (50 MB on an H100 or H200)."""


def _as_linear_runs(kwargs: dict) -> dict:
    """skinny_linear's keyword arguments as ops.linear passes them: a norm that runs in a launch of its own before the
    product (ops.norm_runs_apart; the product's plan is the one swept) leaves the product without a norm."""
    if ops.norm_runs_apart(linear_module.as_norm(kwargs.get("norm"))):
        return {key: value for key, value in kwargs.items() if key != "norm"}
    return kwargs


def _lm_linear_cases(batch: int, device, workspace):
    """The language model's decode linears in bf16, M = batch rows, each product as ops.linear runs it
    (_as_linear_runs), each call's weight one of copies filling COLD_WEIGHT_BYTES in turn."""
    for name, (n, k, rms, residual, gated) in LM_LINEARS.items():
        rows = 2 * n if gated else n
        x = torch.randn(batch, k, device=device, dtype=torch.bfloat16)
        copies = max(2, COLD_WEIGHT_BYTES // (2 * rows * k))
        weights = (torch.randn(copies, rows, k, device=device) / k ** 0.5).to(torch.bfloat16)
        out = torch.empty(batch, n, device=device, dtype=torch.bfloat16)
        kwargs = {"activation": "silu_gate"} if gated else {}
        if rms:
            kwargs["norm"] = ("rms", torch.ones(k, device=device, dtype=torch.bfloat16), 1e-8)
        if residual:
            kwargs["residual"] = torch.randn(batch, n, device=device, dtype=torch.bfloat16)
        kwargs = _as_linear_runs(kwargs)
        calls = iter(range(1 << 62))

        def call(tiles, x=x, weights=weights, out=out, kwargs=kwargs, calls=calls):
            linear_module.skinny_linear(x, weights[next(calls) % len(weights)], out=out, tiles=tiles,
                                        workspace=workspace, **kwargs)

        candidates = linear_module.skinny_linear_candidate_tiles(batch, n, k, torch.bfloat16, split_k=True,
                                                                 gated=gated)
        yield "lm_linear", name, call, candidates


def _paged_cases(batch: int, device, workspace, kv_dtype: torch.dtype = torch.bfloat16):
    """Helium's decode attention at a full window (the bandwidth-bound case), one layer of pools per
    call out of four so that a slot's window is not served from L2; pools of kv_dtype (bf16 activations)."""
    c = LMConfig()
    layers = 4
    cache = PagedKVCache(layers, c.num_heads, c.head_dim, c.context, batch, dtype=kv_dtype, device=device)
    for slot in range(batch):
        cache.admit(slot)
    cache.k_pool.copy_(torch.randn(cache.k_pool.shape, device=device).to(kv_dtype))
    cache.v_pool.copy_(torch.randn(cache.v_pool.shape, device=device).to(kv_dtype))
    cache.positions.fill_(2 * c.context + 17)
    cache.set_exec_mask(torch.ones(batch, dtype=torch.bool, device=device))
    qkv = torch.randn(batch, 3 * c.dim, device=device, dtype=torch.bfloat16)
    out = torch.empty(batch, c.dim, device=device, dtype=torch.bfloat16)
    calls = iter(range(1 << 62))

    def call(tiles):
        paged_module.paged_attention(qkv, *cache.layer(next(calls) % layers), cache.page_table, cache.positions,
                                     cache.exec_mask, c.context, c.max_period, out=out, workspace=workspace,
                                     tiles=tiles)

    splits = (1, 2, 4) if batch * c.num_heads >= 256 else (4, 8, 16, 32)
    # The tensor-core loop's plans, and the FMA loop's best plans of an earlier sweep on an H200.
    candidates = [{"block_n": block_n, "splits": split, "num_warps": warps, "num_stages": stages}
                  for split in splits for block_n in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)]
    if kv_dtype.itemsize == 1:
        # Half the bytes per block: also longer blocks, to keep as many bytes in flight as the 16-bit plans;
        # each plan with the weighted values on the tensor cores and on the FMA path ("dot_values").
        # The three longest splits: at B = 1 on an H200 the e4m3 cache's best plan had 16, then the most swept.
        candidates = [{"block_n": block_n, "splits": split, "num_warps": warps, "num_stages": stages,
                       "dot_values": dot_values}
                      for split in splits[-3:] for block_n in (64, 128, 256) for warps in (4, 8)
                      for stages in (2, 3) for dot_values in (True, False)]
        yield "paged_fp8", "helium", call, candidates
        return
    candidates += [{"block_n": 64, "splits": 16, "num_warps": 4, "num_stages": None, "dot": False},
                   {"block_n": 128, "splits": 2, "num_warps": 4, "num_stages": 4, "dot": False}]
    yield "paged", "helium", call, candidates


def linear_products(model: FastMimi, batch: int, device) -> dict:
    """The Mimi transformer's linears in fp32 at M = 2 batch rows, each as ops.linear runs it (_as_linear_runs):
    name -> (inputs, weight, skinny_linear keyword arguments, out)."""
    c = model.config
    rows = 2 * batch
    layer = model.encoder_transformer.layers[0]
    norm = (layer.norm1.weight, layer.norm1.bias, c.norm_eps)
    x = torch.randn(rows, c.dimension, device=device)
    hidden = torch.randn(rows, c.dim_feedforward, device=device)
    shapes = {
        "qkv+LN": (x, layer.qkv.weight, dict(norm=norm)),
        "out+residual": (x, layer.out.weight, dict(residual=torch.randn(rows, c.dimension, device=device))),
        "fc1+LN+gelu": (x, layer.fc1.weight, dict(norm=norm, activation="gelu")),
        "fc2+residual": (hidden, layer.fc2.weight, dict(residual=torch.randn(rows, c.dimension, device=device))),
    }
    return {name: (inputs, weight, _as_linear_runs(kwargs), torch.empty(rows, weight.shape[0], device=device))
            for name, (inputs, weight, kwargs) in shapes.items()}


def _linear_cases(model: FastMimi, batch: int, device, workspace):
    """The Mimi transformer's linears (linear_products) with their candidate tiles."""
    for name, (inputs, weight, kwargs, out) in linear_products(model, batch, device).items():
        def call(tiles, inputs=inputs, weight=weight, kwargs=kwargs, out=out):
            linear_module.skinny_linear(inputs, weight, out=out, tiles=tiles, workspace=workspace, **kwargs)

        candidates = linear_module.skinny_linear_candidate_tiles(inputs.shape[0], weight.shape[0], weight.shape[1],
                                                                 torch.float32, split_k=True)
        yield "linear", name, call, candidates


def _shape_and_default(model: FastMimi, op: str, name: str, batch: int) -> tuple[str, dict]:
    """The table key of a swept case and the heuristics' own plan there (as tile keyword arguments)."""
    c = model.config
    with tuned.heuristics_only():
        if op == "lm_linear":
            n, k, _, _, gated = LM_LINEARS[name]
            tiles = linear_module.skinny_linear_tiles(batch, n, k, torch.bfloat16, sms=H100_H200_SMS, split_k=True,
                                                      gated=gated)
            return linear_module.linear_plan_key(n, k, torch.bfloat16, gated), tiles._asdict()
        if op in ("paged", "paged_fp8"):
            lm = LMConfig()
            block_n, splits, num_warps, num_stages = paged_module._resolve_tiles(
                batch, lm.num_heads, lm.head_dim, lm.context, None, paged_module.PROGRAMS_PER_SM * H100_H200_SMS)
            dtype = (torch.float8_e4m3fn,) if op == "paged_fp8" else ()
            return (tuned.shape_key(lm.num_heads, lm.head_dim, lm.context, *dtype),
                    {"block_n": block_n, "splits": splits, "num_warps": num_warps, "num_stages": num_stages})
        if op == "ring":
            block_r, num_warps = ring_module._resolve_tiles(batch, c.num_heads, c.head_dim, c.context, None,
                                                            H100_H200_SMS)
            return tuned.shape_key(c.num_heads, c.head_dim, c.context), {"block_r": block_r, "num_warps": num_warps}
        if op == "linear":
            layer = model.encoder_transformer.layers[0]
            weight = {"qkv+LN": layer.qkv, "out+residual": layer.out, "fc1+LN+gelu": layer.fc1,
                      "fc2+residual": layer.fc2}[name].weight
            n, k = weight.shape
            tiles = linear_module.skinny_linear_tiles(2 * batch, n, k, torch.float32, sms=H100_H200_SMS, split_k=True)
            return tuned.shape_key(n, k, torch.float32), tiles._asdict()
        module = dict(model.named_modules())[name]
        t_in = model.streaming_input_lengths()[name]
        if op == "conv1d":
            c_out, c_in, kernel = module.weight.shape
            tiles = conv1d_module._plan(batch, c_in, c_out, kernel, module.stride, t_in)
            return tuned.shape_key(c_in, c_out, kernel, module.stride, t_in), tiles._asdict()
        c_in, kernel = module.weight.shape[0], module.weight.shape[-1]
        geometry = convtr_module._geometry(batch, c_in, module.out_channels, kernel, module.stride, t_in, module.groups)
        return (tuned.shape_key(c_in, module.out_channels, kernel, module.stride, t_in, module.groups),
                convtr_module._plan(geometry)._asdict())


def _parse_tiles(text: str) -> dict:
    if text.startswith("{"):
        return ast.literal_eval(text)
    types = {"ConvTiles": conv1d_module.ConvTiles, "ConvTransposeTiles": convtr_module.ConvTransposeTiles,
             "SkinnyTiles": linear_module.SkinnyTiles}
    call = ast.parse(text, mode="eval").body
    return types[call.func.id](**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})._asdict()


def write_table(sweeps: list[Path], update: bool = False) -> None:
    """kernels/tuned_tiles.json from the sweeps (oldest first); update: starting from the current table, as if
    the sweeps that made it were given first."""
    with torch.device("meta"):
        model = FastMimi(moshiko().mimi)
    table: dict = json.loads(tuned.TABLE_PATH.read_text()) if update and tuned.TABLE_PATH.exists() else {}
    for path in sweeps:
        for case in json.loads(path.read_text())["results"]:
            timed = [c for c in case["candidates"] if "us" in c]
            default = next(c for c in timed if c["tiles"] == "default")
            best = min(timed, key=lambda c: c["us"])
            key, plan = _shape_and_default(model, case["op"], case["name"], case["batch"])
            rows = str(2 * case["batch"] if case["op"] == "linear" else case["batch"])
            op = {"paged": "paged_attention", "paged_fp8": "paged_attention", "lm_linear": "linear"}.get(
                case["op"], case["op"])
            plans = table.setdefault(op, {}).setdefault(key, {})
            # A later sweep's default is the plan an earlier sweep (given first) put in the table.
            plan = plans.get(rows, plan)
            if best["tiles"] != "default" and best["us"] < (1 - NOISE) * default["us"]:
                plan = _parse_tiles(best["tiles"])
            plans[rows] = plan
    tuned.TABLE_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {tuned.TABLE_PATH}: {sum(len(v) for op in table.values() for v in op.values())} plans")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--ops", default="conv1d,convtr,ring,linear",
                        help="any of conv1d,convtr,ring,linear,lm_linear,paged,paged_fp8")
    parser.add_argument("--names", default="",
                        help="comma-separated prefixes: only the cases whose name starts with one of them (e.g. "
                             "decoder. to resume a sweep that its time limit stopped in the encoder)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="write kernels/tuned_tiles.json from these sweeps")
    parser.add_argument("--update", action="store_true",
                        help="with --table: add the sweeps' plans to the current table instead of rebuilding it")
    args = parser.parse_args()
    if args.table:
        write_table(args.table, args.update)
        return
    device = torch.device("cuda")
    swept_ops = set(args.ops.split(","))
    model = MimiCodec.random(moshiko().mimi, device=device, backend="fast", eager=True).model
    workspace = SplitWorkspace(WORKSPACE_FLOATS, 1 << 16, device)
    prefixes = tuple(prefix for prefix in args.names.split(",") if prefix)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        cases = []
        if swept_ops & {"conv1d", "convtr"}:
            cases += [case for case in _conv_cases(model, batch, device, workspace) if case[0] in swept_ops]
        if "ring" in swept_ops:
            cases += list(_ring_cases(model, batch, device, workspace))
        if "linear" in swept_ops:
            cases += list(_linear_cases(model, batch, device, workspace))
        if "lm_linear" in swept_ops:
            cases += list(_lm_linear_cases(batch, device, workspace))
        if "paged" in swept_ops:
            cases += list(_paged_cases(batch, device, workspace))
        if "paged_fp8" in swept_ops:
            cases += list(_paged_cases(batch, device, workspace, torch.float8_e4m3fn))
        for op, name, call, candidates in cases:
            if prefixes and not name.startswith(prefixes):
                continue
            rows = _time_candidates(call, candidates)
            timed = [r for r in rows if "us" in r]
            best = min(timed, key=lambda r: r["us"])
            default = next((r for r in rows if r["tiles"] == "default"), {})
            print(f"{op:7s} {name:30s} B={batch:3d} default {default.get('us', float('nan')):8.1f} us | best "
                  f"{best['us']:8.1f} us {best['tiles']}", flush=True)
            results.append({"op": op, "name": name, "batch": batch, "candidates": rows})
            if args.json:  # after every case, so a run stopped at its time limit keeps what it measured
                args.json.write_text(json.dumps({**device_info(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
