"""Strict checkpoint loading: every problem reported at once, corrupt files rejected clearly."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moshi_fast import CheckpointError, FastMoshi, MimiCodec, TextTokenizer
from moshi_fast.reference.lm import LM
from moshi_fast.weights import find_moshi_checkpoint, load_lm


@pytest.fixture
def kyutai_dir(kyutai_moshi, tmp_path):
    _, directory = kyutai_moshi
    copy = tmp_path / "ckpt"
    shutil.copytree(directory, copy)
    return copy


def _edit(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_unexpected_and_misshaped_keys_are_listed_together(kyutai_dir):
    def edit(state):
        del state["transformer.layers.1.gating.linear_in.weight"]
        del state["depformer_emb.3.weight"]
        state["extra_head.weight"] = torch.zeros(3, 3)
        state["text_linear.weight"] = torch.zeros(7, 64)

    _edit(kyutai_dir / "lm.safetensors", edit)
    with pytest.raises(CheckpointError) as error:
        FastMoshi.from_pretrained(kyutai_dir, device="cpu")
    message = str(error.value)
    for fragment in ("2 missing", "transformer.layers.1.gating.linear_in.weight", "depformer_emb.3.weight",
                     "1 unexpected", "extra_head.weight", "1 mis-shaped", "text_linear.weight: [7, 64]"):
        assert fragment in message, message


def test_mimi_key_errors(kyutai_mimi, tmp_path):
    _, path = kyutai_mimi
    broken = tmp_path / "mimi.safetensors"
    shutil.copy(path, broken)

    def edit(state):
        del state["decoder.model.14.conv.conv.bias"]
        state["upsample.convtr.convtr.convtr.weight"] = torch.zeros(512, 2, 4)

    _edit(broken, edit)
    with pytest.raises(CheckpointError, match=r"1 missing: decoder\.model\.14\.conv\.conv\.bias.*1 mis-shaped"):
        MimiCodec.from_pretrained(broken, device="cpu")


def test_corrupt_and_truncated_files(kyutai_dir):
    lm_file = kyutai_dir / "lm.safetensors"
    data = lm_file.read_bytes()
    lm_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        FastMoshi.from_pretrained(kyutai_dir, device="cpu")
    lm_file.write_bytes(b"\x93garbage, not a safetensors header" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        FastMoshi.from_pretrained(kyutai_dir, device="cpu")


def test_missing_files(kyutai_dir, tmp_path):
    (kyutai_dir / "codec.safetensors").unlink()
    with pytest.raises(CheckpointError, match="codec.safetensors"):
        FastMoshi.from_pretrained(kyutai_dir, device="cpu")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        FastMoshi.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_non_finite_weights_are_rejected(kyutai_dir):
    _edit(kyutai_dir / "lm.safetensors", lambda s: s["out_norm.alpha"].view(-1).__setitem__(3, float("nan")))
    with pytest.raises(CheckpointError, match="out_norm.weight holds NaN"):
        FastMoshi.from_pretrained(kyutai_dir, device="cpu")


def test_corrupt_tokenizer(kyutai_dir, tmp_path):
    (kyutai_dir / "spm.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="SentencePiece"):
        FastMoshi.from_pretrained(kyutai_dir, device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        TextTokenizer(tmp_path / "absent.model")


def test_unsupported_config_is_rejected(kyutai_dir):
    config = json.loads((kyutai_dir / "config.json").read_text())
    (kyutai_dir / "config.json").write_text(json.dumps({**config, "gating": "none", "norm": "layer_norm"}))
    with pytest.raises(ValueError, match="gating='none'.*norm='layer_norm'"):
        FastMoshi.from_pretrained(kyutai_dir, device="cpu")
    (kyutai_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FastMoshi.from_pretrained(kyutai_dir, device="cpu")


def test_sharded_transformers_checkpoint(hf_moshi, tmp_path):
    model, directory = hf_moshi
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    single = load_lm(find_moshi_checkpoint(directory), lambda: LM(find_moshi_checkpoint(directory).config.lm),
                     torch.float32, "cpu").state_dict()
    checkpoint = find_moshi_checkpoint(sharded)
    from_shards = load_lm(checkpoint, lambda: LM(checkpoint.config.lm), torch.float32, "cpu").state_dict()
    assert all(torch.equal(single[k], from_shards[k]) for k in single)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard not found"):
        load_lm(checkpoint, lambda: LM(checkpoint.config.lm), torch.float32, "cpu")
