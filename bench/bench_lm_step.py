"""The LM step per 80 ms frame (Helium + depth transformer + sampling): moshi_fast's fast step (one CUDA
graph) vs Kyutai's `LMGen.step` (its own CUDA graphs), same random weights, same run.

    python bench/bench_lm_step.py --batches 1,8,32,64 --contexts 100,3000 --frames 30 --json results.json

Kyutai's LMModel is built by its own code (`moshi.models.loaders.get_moshi_lm`, its own random init) at
Moshi's real config in bf16; ours takes the same tensors through our loader's Kyutai name map (shared
storage where the layouts agree). Context c means every slot is at frame c: its cache holds c earlier
tokens (random keys and values, random valid tokens in the delay line), as in a conversation c frames
old. Kyutai's dense ring attends over all 3000 slots whatever c is; the paged cache reads min(c + 1, 3000)
keys. Both sample with Kyutai's defaults (text: temperature 0.7, top-k 25; audio: 0.8, 250). Each
figure is the median (and 90th percentile) wall time of one step call with the GPU synchronised after
it, over `--frames` frames after warm-up. The two engines run one after the other per batch size (their
KV caches would not fit together at B = 64), so the memory column is each one's peak during its run.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import (GPU_FAULTS, add_variant_options, device_info, graph_time, kept_runs,  # noqa: E402
                            recorded_fault, selected_variants, timed_calls, variant_runs)
from moshi_fast import ops  # noqa: E402
from moshi_fast.cache import LMCache  # noqa: E402
from moshi_fast.config import moshiko  # noqa: E402
from moshi_fast.fast.lm import FastLM, FastLMRunner  # noqa: E402
from moshi_fast.reference.lm import SamplingParams  # noqa: E402
from moshi_fast.weights import lm_spec_kyutai  # noqa: E402

KYUTAI_SAMPLING = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}


def kyutai_lm(config):
    from moshi.models import loaders

    torch.manual_seed(0)
    model = loaders.get_moshi_lm(None, lm_kwargs=config.to_kyutai_dict(), device="cuda", dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def ours_from_kyutai(kyutai, config) -> FastLM:
    """Our FastLM on Kyutai's tensors, through the loader's Kyutai name map."""
    state = kyutai.state_dict()
    with torch.device("meta"):
        lm = FastLM(config).to(torch.bfloat16)
    params = {}
    for name, sources in lm_spec_kyutai(config).items():
        source = next(s for s in sources if all(k in state for k in s.keys))
        params[name] = source.combine([state[k] for k in source.keys]).contiguous()
    lm.load_state_dict(params, strict=True, assign=True)
    return lm.eval().requires_grad_(False).prepare()


def _percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return 1000 * ordered[len(ordered) // 2], 1000 * ordered[int(0.9 * (len(ordered) - 1))]


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _random_tokens(shape, config, device) -> torch.Tensor:
    """Valid tokens of each stream (text ids in stream 0, audio codes elsewhere) for a delay line [B, S, T]."""
    tokens = torch.randint(0, config.card, shape, device=device)
    tokens[:, 0] = torch.randint(0, config.text_card, tokens[:, 0].shape, device=device)
    return tokens


def _set_kyutai_context(lm_gen, context: int, config) -> None:
    """Every slot of Kyutai's streaming state at frame `context`, its caches full of random entries."""
    for module in lm_gen.lm_model.modules():
        state = getattr(module, "_streaming_state", None)
        if state is None:
            continue
        for name in ("offset", "offsets"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                value.fill_(context)
        cache = getattr(state, "kv_cache", None)
        if cache is not None:
            cache.end_offset.fill_(context)
            cache.cache.normal_()
    state = lm_gen._streaming_state
    state.offsets.fill_(context)
    state.cache.copy_(_random_tokens(state.cache.shape, config, state.cache.device))


def bench_kyutai(kyutai, config, batch: int, contexts: list[int], frames: int, warmup: int) -> dict:
    from moshi.models.lm import LMGen

    row = {}
    torch.cuda.reset_peak_memory_stats()
    lm_gen = LMGen(kyutai, **KYUTAI_SAMPLING)
    codes = torch.randint(0, config.card, (warmup + frames, batch, config.dep_q, 1), device="cuda")
    with torch.no_grad(), lm_gen.streaming(batch):
        for context in contexts:
            _set_kyutai_context(lm_gen, context, config)
            for t in range(warmup):
                lm_gen.step(codes[t])
            p50, p90 = _percentiles(timed_calls(lm_gen.step, codes[warmup:]))
            row[f"kyutai_ms_ctx{context}"], row[f"kyutai_p90_ms_ctx{context}"] = p50, p90
    row["kyutai_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del lm_gen
    _release()
    return row


def _sampling(batch: int) -> SamplingParams:
    full = lambda value, dtype: torch.full((batch,), value, dtype=dtype, device="cuda")  # noqa: E731
    s = KYUTAI_SAMPLING
    return SamplingParams(full(s["temp_text"], torch.float32), full(s["top_k_text"], torch.long),
                          full(s["temp"], torch.float32), full(s["top_k"], torch.long),
                          torch.arange(batch, device="cuda"), s["top_k_text"], s["top_k"])


def _set_fast_context(cache: LMCache, context: int, config) -> None:
    cache.frame.fill_(context)
    cache.kv.positions.fill_(context)
    cache.tokens.copy_(_random_tokens(cache.tokens.shape, config, cache.tokens.device))
    for layer in range(config.num_layers):
        for pool in cache.kv.layer(layer):
            if pool.dtype.itemsize == 1:
                # No random kernels for 8-bit floats: bf16 draws, rounded as the cache rounds its writes.
                pool.copy_(torch.randn(pool.shape, dtype=torch.bfloat16, device=pool.device))
            else:
                pool.normal_()


def bench_fast(lm: FastLM, config, batch: int, contexts: list[int], frames: int, warmup: int,
               name: str = "fast", kv_dtype: torch.dtype | None = None) -> dict:
    row = {}
    torch.cuda.reset_peak_memory_stats()
    runner = FastLMRunner(lm, batch, _sampling(batch), torch.device("cuda"), kv_dtype=kv_dtype)
    mask = torch.ones(batch, dtype=torch.bool, device="cuda")
    codes = torch.randint(0, config.card, (warmup + frames, batch, config.dep_q), device="cuda")
    with torch.no_grad():
        for context in contexts:
            _set_fast_context(runner.cache, context, config)
            for t in range(warmup):
                runner.step(codes[t], mask)
            p50, p90 = _percentiles(timed_calls(lambda c: runner.step(c, mask), codes[warmup:]))
            row[f"{name}_ms_ctx{context}"], row[f"{name}_p90_ms_ctx{context}"] = p50, p90
    row[f"{name}_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del runner
    _release()
    return row


LM_PART_VARIANTS = ("fast_triton_sampling", "fast_depth_triton_linears", "fast_depth_gemv_fused_norms",
                    "fast_cuda_depth_step")
"""The variants whose parts --breakdown also times (they change the text head's sampling or the depth transformer;
Helium is the default's)."""


def fast_breakdown(lm: FastLM, config, batch: int, context: int) -> dict:
    """GPU time of the fast step's parts, each captured alone in a CUDA graph (ms): Helium's 32 layers
    (embedding included), the text head and its sampling, the depth transformer's 8 steps with theirs."""
    runner = FastLMRunner(lm, batch, _sampling(batch), torch.device("cuda"), eager=True)
    cache, params = runner.cache, runner.generator.params
    _set_fast_context(runner.cache, context, config)
    cache.kv.set_exec_mask(torch.ones(batch, dtype=torch.bool, device="cuda"))
    tokens = _random_tokens((batch, config.num_streams, 1), config, "cuda")[..., 0]
    x = lm.helium(tokens, cache)
    token = torch.empty(batch, dtype=torch.long, device="cuda")

    def text():
        logits = lm.text_logits(*lm.head_inputs(x), cache)
        ops.sample_tokens(logits, params.text_temperature, params.text_top_k, params.max_text_top_k, params.seed,
                          cache.frame, 0, out=token)

    def depth():
        inputs = lm.depth_inputs(*lm.head_inputs(x), cache)
        logits = torch.empty(batch, config.card, dtype=x.dtype, device="cuda")
        for step in range(config.dep_q):
            lm.depth_step(step, inputs[step], token, cache, logits)
            ops.sample_tokens(logits, params.audio_temperature, params.audio_top_k, params.max_audio_top_k,
                              params.seed, cache.frame, 1 + step, out=token)

    with torch.no_grad():
        parts = {"helium": lambda: lm.helium(tokens, cache), "text": text, "depth": depth}
        row = {f"{name}_ms": 1000 * graph_time(fn, iters=10, reps=5) for name, fn in parts.items()}
    del runner
    _release()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--contexts", default="100,3000")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the fast step's parts (Helium, text head, depth transformer) alone")
    parser.add_argument("--json", type=Path)
    add_variant_options(parser, "the fast step")
    args = parser.parse_args(argv)
    info = device_info()
    print(f"# {info}", flush=True)
    config = moshiko().lm
    contexts = [int(c) for c in args.contexts.split(",")]
    kyutai = kyutai_lm(config)
    lm = ours_from_kyutai(kyutai, config)
    if "kyutai" in args.skip:
        kyutai = None  # ours keeps the tensors it shares; the rest of Kyutai's model is freed
        _release()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        row = {"batch": batch, "frames": args.frames}
        runs = [("kyutai", lambda: bench_kyutai(kyutai, config, batch, contexts, args.frames, args.warmup)),
                ("fast", lambda: bench_fast(lm, config, batch, contexts, args.frames, args.warmup))]
        runs += variant_runs(args, lambda name, kv_dtype: bench_fast(lm, config, batch, contexts, args.frames,
                                                                     args.warmup, name=name, kv_dtype=kv_dtype))
        runs = kept_runs(args, runs)
        for name, run in runs:
            try:
                row.update(run())
            except GPU_FAULTS as error:
                row[f"{name}_error"] = recorded_fault(error, _release)
        if args.breakdown:
            for context in contexts:
                # The default's parts, then each variant's that differ (its Helium is the default's).
                breakdowns = [("", fast_breakdown)] + [
                    (variant.name.removeprefix("fast_") + "_", functools.partial(variant.wrapper, fast_breakdown))
                    for variant in selected_variants(args) if variant.name in LM_PART_VARIANTS]
                for prefix, breakdown in breakdowns:
                    try:
                        parts = breakdown(lm, config, batch, context)
                    except GPU_FAULTS as error:
                        row[f"{prefix}breakdown_error_ctx{context}"] = recorded_fault(error, _release)
                        continue
                    row.update({f"{prefix}{name}_ctx{context}": value for name, value in parts.items()
                                if not prefix or name != "helium_ms"})
        for context in contexts:
            if f"kyutai_ms_ctx{context}" in row and f"fast_ms_ctx{context}" in row:
                row[f"speedup_ctx{context}"] = row[f"kyutai_ms_ctx{context}"] / row[f"fast_ms_ctx{context}"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    variants = [name for name, _ in runs if name not in ("kyutai", "fast")]
    print(f"\n{'B':>3} {'ctx':>5} {'Kyutai p50':>11} {'fast p50':>11} {'fast p90':>11} {'speed-up':>9}"
          + "".join(f" {name + ' p50':>22}" for name in variants))
    for row in rows:
        for context in contexts:
            k, f = row.get(f"kyutai_ms_ctx{context}"), row.get(f"fast_ms_ctx{context}")
            values = [k, f, row.get(f"fast_p90_ms_ctx{context}")]
            cells = [f"{v:>9.2f}ms" if v is not None else f"{'-':>11}" for v in values]
            extra = [row.get(f"{name}_ms_ctx{context}") for name in variants]
            ratio = f"{k / f:>8.2f}x" if k and f else f"{'-':>9}"
            print(f"{row['batch']:>3} {context:>5} {' '.join(cells)} {ratio}"
                  + "".join(f" {v:>20.2f}ms" if v is not None else f" {'-':>22}" for v in extra))
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "lm_step", **info,
            "config": "Moshi LM real config (moshiko), Kyutai's random init, bf16, Kyutai's default sampling",
            "compare_table": args.compare_table.path if args.compare_table else None, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
