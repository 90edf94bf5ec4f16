"""bench/sweep_tiles.py --table on a synthetic sweep (the sweep itself needs a GPU): an e4m3 cache's attention
plans and the gated products' plans go under keys of their own, and --update keeps the plans already in the table."""
import json

import pytest

from bench import sweep_tiles
from moshi_fast.kernels import tuned
from moshi_fast.kernels.skinny_linear import SkinnyTiles


def _sweep(path, op, batch, default_us, best_us, best_tiles, name="helium"):
    path.write_text(json.dumps({"results": [{"op": op, "name": name, "batch": batch, "candidates": [
        {"tiles": "default", "us": default_us}, {"tiles": repr(best_tiles), "us": best_us}]}]}))
    return path


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "tuned_tiles.json"
    path.write_text(json.dumps({"conv1d": {"1,2,3,1,4": {"1": {"block_c": 16}}}}))
    monkeypatch.setattr(tuned, "TABLE_PATH", path)
    return path


def test_update_adds_the_fp8_attention_plan_under_its_own_key(table, tmp_path):
    plan = {"block_n": 256, "splits": 1, "num_warps": 8, "num_stages": 2}
    sweep_tiles.write_table([_sweep(tmp_path / "sweep.json", "paged_fp8", 64, 870.0, 600.0, plan)], update=True)
    written = json.loads(table.read_text())
    assert written["conv1d"] == {"1,2,3,1,4": {"1": {"block_c": 16}}}
    assert written["paged_attention"] == {"32,128,3000,float8_e4m3fn": {"64": plan}}


def test_a_plan_within_the_noise_keeps_the_heuristics_and_rebuilding_drops_the_rest(table, tmp_path):
    plan = {"block_n": 128, "splits": 1, "num_warps": 8, "num_stages": 2}
    sweep_tiles.write_table([_sweep(tmp_path / "sweep.json", "paged_fp8", 64, 870.0, 860.0, plan)])
    written = json.loads(table.read_text())
    assert list(written) == ["paged_attention"]
    kept = written["paged_attention"]["32,128,3000,float8_e4m3fn"]["64"]
    assert kept != plan and kept["block_n"] == 64


def test_the_gated_depth_product_plan_goes_under_its_own_key(table, tmp_path):
    plan = SkinnyTiles(block_m=64, block_n=32, block_k=64, dot=True, split_k=2, num_warps=8, num_stages=2)
    sweep = _sweep(tmp_path / "sweep.json", "lm_linear", 64, 16.0, 9.0, plan, name="dep.gate_up+rms+silu")
    sweep_tiles.write_table([sweep], update=True)
    assert json.loads(table.read_text())["linear"] == {"2816,1024,bfloat16,silu_gate": {"64": plan._asdict()}}
