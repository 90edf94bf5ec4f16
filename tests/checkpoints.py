"""Checkpoints written by Kyutai's and transformers' own code, with random weights, for loader and
parity tests. Nothing here is ours but the randomisation: every model and file format comes from
the `moshi` package or from `transformers`."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file

from moshi_fast.config import KYUTAI_MIMI_FILE, tiny

from .helpers import speech_like

TINY = tiny()
TINY_TEXT_CARD = TINY.lm.text_card


def _projected_latent_stats(encode, input_projs) -> list[tuple[torch.Tensor, float]]:
    """Per-channel mean and deviation of each RVQ's projected latent on speech-like audio, read by
    forward hooks on the input projections."""
    stats = []

    def record(module, args, out):
        mean = out.mean(dim=(0, 2))
        stats.append((mean, float((out - mean[:, None]).std())))

    hooks = [proj.register_forward_hook(record) for proj in input_projs]
    with torch.no_grad():
        encode(speech_like(2, 8, seed=11))
    for hook in hooks:
        hook.remove()
    return stats


def _random_codebooks(model, encode, input_projs, sum_name: str, usage_name: str, cache_name: str) -> None:
    """Codewords spread around the latent they quantize, so that the nearest codeword follows the
    audio (codewords far from the latent make every code the same)."""
    stats = _projected_latent_stats(encode, input_projs)
    rvq_of = {"rvq_first": 0, "semantic_residual_vector_quantizer": 0,
              "rvq_rest": 1, "acoustic_residual_vector_quantizer": 1}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        buffers = dict(model.named_buffers())
        for name, buffer in sorted(buffers.items()):
            if name.endswith(sum_name):
                usage = buffers[name[: -len(sum_name)] + usage_name]
                usage.copy_(torch.rand(usage.shape, generator=generator) * 1.5 + 0.5)
                mean, deviation = stats[next(i for part, i in rvq_of.items() if f".{part}." in f".{name}")]
                level = int(re.search(r"layers\.(\d+)\.", name).group(1))
                # Only the first level of each RVQ sees the latent itself; later levels see residuals.
                center = mean if level == 0 else torch.zeros_like(mean)
                codewords = center + deviation * torch.randn(buffer.shape, generator=generator)
                buffer.copy_(codewords * usage[:, None])
    for module in model.modules():
        if hasattr(module, cache_name):
            setattr(module, cache_name, None)


def _randomize_kyutai_mimi(model) -> None:
    """A fresh Kyutai Mimi has all-zero codebooks and LayerScale 0.01: randomise what matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_scale" in name:
                param.uniform_(0.05, 0.3)
            elif ".norm" in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    quantizer = model.quantizer
    _random_codebooks(model, model.encode, [quantizer.rvq_first.input_proj, quantizer.rvq_rest.input_proj],
                      "embedding_sum", "cluster_usage", "_embedding")


def kyutai_file_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A live Kyutai model's state_dict under the names of Kyutai's released files: per-step
    attention projections `in_projs.{i}` / `out_projs.{i}` stacked into `in_proj_weight` / `out_proj.weight`."""
    out, stacks = {}, {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*self_attn)\.(in|out)_projs\.(\d+)\.weight", key)
        if match:
            stacks.setdefault((match.group(1), match.group(2)), {})[int(match.group(3))] = value
        else:
            out[key] = value.contiguous()
    for (prefix, kind), parts in stacks.items():
        name = f"{prefix}.in_proj_weight" if kind == "in" else f"{prefix}.out_proj.weight"
        out[name] = torch.cat([parts[i] for i in sorted(parts)]).contiguous()
    return out


def kyutai_mimi(path: Path, config: dict | None = None):
    from moshi.models import loaders

    torch.manual_seed(0)
    model = loaders.get_mimi(None, mimi_config=config, device="cpu")
    _randomize_kyutai_mimi(model)
    save_file(kyutai_file_names(model.state_dict()), str(path))
    return model, path


def kyutai_lm(config=TINY.lm):
    """Kyutai's LMModel at our tiny config, fp32, with random RMSNorm scales (they start at 1)."""
    from moshi.models import loaders

    torch.manual_seed(1)
    model = loaders.get_moshi_lm(None, lm_kwargs=config.to_kyutai_dict(), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("alpha"):
                param.normal_(1.0, 0.1)
    return model.eval()


def kyutai_moshi(directory: Path, mimi_file: Path):
    """A Kyutai checkpoint directory with config.json naming its files (tiny LM, given Mimi)."""
    lm = kyutai_lm()
    save_file(kyutai_file_names(lm.state_dict()), str(directory / "lm.safetensors"))
    shutil.copy(mimi_file, directory / "codec.safetensors")
    train_tokenizer(directory, TINY_TEXT_CARD, name="spm.model")
    config = {**TINY.lm.to_kyutai_dict(), "moshi_name": "lm.safetensors", "mimi_name": "codec.safetensors",
              "tokenizer_name": "spm.model", "lm_gen_config": {"temp": 0.6, "top_k": 100}}
    (directory / "config.json").write_text(json.dumps(config))
    return lm, directory


def _randomize_hf_mimi(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_scale" in name:
                param.uniform_(0.05, 0.3)
            elif "layernorm" in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    quantizer = model.quantizer
    _random_codebooks(model, lambda x: model.encode(x, num_quantizers=8),
                      [quantizer.semantic_residual_vector_quantizer.input_proj,
                       quantizer.acoustic_residual_vector_quantizer.input_proj],
                      "codebook.embed_sum", "codebook.cluster_usage", "_embed")


def hf_mimi(directory: Path):
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(2)
    model = MimiModel(MimiConfig()).eval()
    _randomize_hf_mimi(model)
    model.save_pretrained(directory)
    return model, directory


def hf_moshi(directory: Path):
    from transformers import MimiConfig, MoshiConfig, MoshiForConditionalGeneration

    config = MoshiConfig(
        vocab_size=TINY_TEXT_CARD, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=352,
        num_codebooks=8, audio_encoder_config=MimiConfig(num_hidden_layers=1, num_quantizers=8).to_dict(),
        depth_decoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=176))
    torch.manual_seed(3)
    model = MoshiForConditionalGeneration(config).eval()
    _randomize_hf_mimi(model.audio_encoder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight")) and not name.startswith("audio_encoder."):
                param.normal_(1.0, 0.1)
    model.save_pretrained(directory)
    return model, directory


def train_tokenizer(directory: Path, vocab_size: int, name: str = "tokenizer.model") -> Path:
    """A SentencePiece model trained on generated pseudo-words, with exactly vocab_size pieces."""
    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)))
    prefix = directory / Path(name).stem
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        minloglevel=2, hard_vocab_limit=True)
    model = prefix.with_suffix(".model")
    if model.name != name:
        model.rename(directory / name)
    return directory / name


__all__ = ["KYUTAI_MIMI_FILE", "hf_mimi", "hf_moshi", "kyutai_file_names", "kyutai_lm", "kyutai_mimi",
           "kyutai_moshi", "train_tokenizer"]
