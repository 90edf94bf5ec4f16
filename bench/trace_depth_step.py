"""Where the CUDA persistent depth step's time goes: the timeline each block writes (csrc/depth_step_kernel.cuh,
`cuda_ext.depth_step(..., trace=...)`), at Moshi's shapes with random weights, summed up per phase kind.

    python bench/trace_depth_step.py --batch 1 --frames 6 --stages 6,3,2 --refills chunk,inputs --json trace.json

For each pipeline depth in --stages (weight chunks in flight per block) and each refill point in --refills (when
the warps refill their weight slots: `cuda_ext.depth_step`'s refills), the 8 steps of a frame are first timed
in a CUDA graph (20 frames a replay, median of 9 replays), beside the default sequence of launches the fast LM runs
(bench_depth_step's `unfused`), then traced. Each of the 8 codebook steps of a frame is one launch; launches run
eagerly one after another (no graph, so that each has its own timeline), the first frames as warm-up. A block
writes the GPU's global timer (ns) at its start, after its wait for the previous kernel, and in each of the 4 L + 1
product phases at its start (after the grid barrier), once its input rows are ready (x read, RMSNorm'd, or the
attention computed) and at its end. Per phase kind (qkv, out, gate_up, down of every layer, the head), averaged over layers, steps and frames:

- critical: from the last block's end of the previous phase to the last block's end of this one (the phases'
  critical values sum to the launch's span past its first phase);
- barrier: from the last block's end of the previous phase to a block's start of this one (median and
  slowest block): what the grid barrier costs after its last arrival;
- inputs: from start to inputs ready, median over the blocks that own tiles in the phase;
- tiles: from inputs ready to end, the slowest block (the one whose tiles end last).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import device_info, graph_time  # noqa: E402
from bench.bench_depth_step import EPS, SHAPES, DepthOperands  # noqa: E402
from moshi_fast import cuda_ext  # noqa: E402

KINDS = ("qkv", "out", "gate_up", "down")
START, READY, END = range(3)


def phase_tiles(layers: int, dim: int, hidden: int, card: int) -> list[tuple[str, int]]:
    """(kind, tiles) of each product phase of a step, as the kernel tiles them: 16 weight rows a tile, 8 gate rows
    and their 8 up rows for gate_up."""
    per_layer = [("qkv", -(-3 * dim // 16)), ("out", -(-dim // 16)), ("gate_up", -(-hidden // 8)),
                 ("down", -(-dim // 16))]
    return per_layer * layers + [("head", -(-card // 16))]


def owners(tiles: list[tuple[str, int]], blocks: int) -> list[torch.Tensor]:
    """For each phase, which blocks own at least one tile: tiles go round robin, each phase starting at the block
    after the previous phase's last tile."""
    first, masks = 0, []
    for _, count in tiles:
        offset = (torch.arange(blocks) - first) % blocks
        masks.append(offset < count)
        first = (first + count) % blocks
    return masks


def summarize_launch(trace: torch.Tensor, tiles, owned) -> dict:
    """Per-phase figures (µs) of one launch's timeline [blocks, 2 + 3 P]."""
    t = trace.double() / 1000.0
    phases = t[:, 2:].reshape(t.shape[0], len(tiles), 3)
    rows = []
    for p, (kind, _) in enumerate(tiles):
        end = phases[:, p, END].max().item()
        previous_end = phases[:, p - 1, END].max().item() if p else t[:, 1].max().item()
        barrier = phases[:, p, START] - previous_end
        mask = owned[p]
        inputs = (phases[mask, p, READY] - phases[mask, p, START])
        last = int(torch.argmax(torch.where(mask, phases[:, p, END], torch.full_like(phases[:, p, END], -1e30))))
        rows.append(dict(kind=kind, critical=end - previous_end, barrier_median=barrier.median().item(),
                         barrier_max=barrier.max().item(), inputs_median=inputs.median().item(),
                         tiles_last=(phases[last, p, END] - phases[last, p, READY]).item()))
    span = phases[:, -1, END].max().item() - t[:, 0].min().item()
    waited = (t[:, 1] - t[:, 0]).median().item()
    return dict(span=span, wait_median=waited, first_phase_start=(phases[:, 0, START].min() - t[:, 0].min()).item(),
                phases=rows)


def by_kind(launches: list[dict]) -> dict:
    """Means per phase kind over every launch and layer."""
    fields = ("critical", "barrier_median", "barrier_max", "inputs_median", "tiles_last")
    out = {}
    for kind in (*KINDS, "head"):
        rows = [r for launch in launches for r in launch["phases"] if r["kind"] == kind]
        out[kind] = {f: round(statistics.fmean(r[f] for r in rows), 3) for f in fields} | {"phases": len(rows)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=6, help="frames traced, the first two as warm-up")
    parser.add_argument("--stages", default="6,3,2", help="pipeline depths, each timed and traced")
    parser.add_argument("--refills", default="chunk",
                        help="refill points, each timed and traced at every depth: "
                             + ", ".join(cuda_ext.DEPTH_REFILLS))
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not cuda_ext.available():
        sys.exit("trace_depth_step needs a GPU and the CUDA extension")
    device = torch.device("cuda")
    o = DepthOperands(args.batch, device)
    s = SHAPES
    blocks = cuda_ext.depth_step_blocks(device)
    slots = cuda_ext.depth_step_trace_slots(s["layers"])
    tiles = phase_tiles(s["layers"], s["dim"], s["hidden"], s["card"])
    owned = owners(tiles, blocks)
    unfused_us = graph_time(o.unfused, iters=20, reps=9) * 1e6
    runs = []
    configs = [(int(v), refills) for refills in args.refills.split(",") for v in args.stages.split(",")]
    for stages, refills in configs:
        def frame(trace=None):
            o.x.copy_(o.inputs)
            for step in range(o.steps):
                cuda_ext.depth_step(o.x[step], o.previous[step], o.table, o.offsets[step:step + 1], o.norm1,
                                    o.qkv[:, step], o.out_proj[:, step], o.norm2, o.gate_up[:, step],
                                    o.down[:, step], o.heads[step], o.k_cache, o.v_cache, step, EPS,
                                    o.logits[:, step], o.scratch, stages=stages, refills=refills,
                                    trace=None if trace is None else trace[step])

        graph_us = graph_time(frame, iters=20, reps=9) * 1e6
        traces = torch.zeros(args.frames, o.steps, blocks, slots, dtype=torch.int64, device=device)
        for f in range(args.frames):
            frame(traces[f])
        torch.cuda.synchronize()
        warmup = min(2, args.frames - 1)
        launches = [summarize_launch(traces[f, step].cpu(), tiles, owned)
                    for f in range(warmup, args.frames) for step in range(o.steps)]
        run = dict(stages=stages, refills=refills, frame_us_graph=round(graph_us, 1),
                   traced_frames=args.frames - warmup,
                   span_us_per_step=round(statistics.fmean(launch["span"] for launch in launches), 2),
                   first_phase_start_us=round(statistics.fmean(launch["first_phase_start"] for launch in launches),
                                              2),
                   per_kind_us=by_kind(launches),
                   per_phase_us_last_step=[{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                           for r in launches[o.steps - 1]["phases"]])
        runs.append(run)
        print(f"B = {args.batch}, {blocks} blocks, {stages} stages, refills after {refills}: frame {graph_us:.1f} us "
              f"in a graph (default sequence {unfused_us:.1f} us); traced, {run['span_us_per_step']} us a step "
              f"(launch span)")
        print(f"{'kind':8} {'critical':>9} {'barrier':>9} {'barrier max':>12} {'inputs':>8} {'tiles':>8}")
        for kind, row in run["per_kind_us"].items():
            print(f"{kind:8} {row['critical']:9.2f} {row['barrier_median']:9.2f} {row['barrier_max']:12.2f} "
                  f"{row['inputs_median']:8.2f} {row['tiles_last']:8.2f}")
    result = dict(info=device_info(), batch=args.batch, blocks=blocks, **o.config(),
                  default_sequence_frame_us_graph=round(unfused_us, 1), runs=runs)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
