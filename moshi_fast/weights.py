"""Checkpoints -> this engine's parameters, with strict validation.

Formats:
  * Kyutai's LM file (`model.safetensors`): the file's names (`self_attn.in_proj_weight`, per-step
    weights of the depth transformer stacked on dim 0) or a live Kyutai model's `state_dict()` names
    (`self_attn.in_projs.{i}.weight`); RMSNorm `alpha` [1, 1, D].
  * Kyutai's Mimi file (`tokenizer-e351c8d8-checkpoint125.safetensors`): EMA codebooks become
    centroids embedding_sum / clamp(cluster_usage, 1e-5); only the codebooks the model uses are read.
  * transformers' `save_pretrained` directories of `MimiModel` and `MoshiForConditionalGeneration`
    (one file or shards with `model.safetensors.index.json`): q/k rows are stored permuted for
    rotate-half RoPE and are permuted back to Kyutai's interleaved pairs; the depth decoder's
    per-codebook weights are already stacked.

Every load first checks the whole key set and every shape against the config, and raises one
`CheckpointError` that lists all missing, unexpected and mis-shaped keys; a file that cannot be
parsed raises `CheckpointError` too. Tensors are then read one at a time, converted, and assigned
to a model built on the meta device, so a failed load leaves no partly loaded model behind.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import (KYUTAI_LM_FILE, KYUTAI_MIMI_FILE, KYUTAI_TOKENIZER_FILE, LMConfig, MimiConfig, MoshiConfig,
                     load_checkpoint_config)

CODEBOOK_EPSILON = 1e-5


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into, or that cannot be read."""


@dataclass(frozen=True)
class Source:
    """Where one parameter comes from: file keys with their expected shapes, and how to combine them."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


Spec = dict[str, list[Source]]
"""Our parameter name -> alternative sources (the first whose keys are all present is used)."""


def _copy(key: str, shape: Sequence[int], reshape: Sequence[int] | None = None) -> Source:
    target = tuple(reshape) if reshape is not None else None
    return Source((key,), (tuple(shape),), lambda ts: ts[0].reshape(target) if target else ts[0])


def _stack(keys: Sequence[str], shape: Sequence[int]) -> Source:
    return Source(tuple(keys), tuple(tuple(shape) for _ in keys), lambda ts: torch.stack(ts))


def _centroids(prefix: str, size: int, dim: int, names: tuple[str, str, str]) -> Source:
    total, usage, initialized = names
    return Source((f"{prefix}.{total}", f"{prefix}.{usage}", f"{prefix}.{initialized}"),
                  ((size, dim), (size,), (1,)),
                  lambda ts: ts[0].float() / ts[1].float().clamp(min=CODEBOOK_EPSILON)[:, None])


def _stacked_centroids(prefixes: Sequence[str], size: int, dim: int, names: tuple[str, str, str]) -> Source:
    parts = [_centroids(p, size, dim, names) for p in prefixes]
    return Source(tuple(k for p in parts for k in p.keys), tuple(s for p in parts for s in p.shapes),
                  lambda ts: torch.stack([p.combine(ts[3 * i: 3 * i + 3]) for i, p in enumerate(parts)]))


def _unpermute_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """transformers' q/k rows (rotate-half RoPE) back to Kyutai's interleaved pairs."""
    out_dim, in_dim = weight.shape
    return weight.view(num_heads, 2, out_dim // num_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _hf_qkv(prefix: str, dim: int, num_heads: int, leaf: str = "weight") -> Source:
    """q|k|v of transformers' attention; Moshi wraps its projections (leaf "linear.weight"), Mimi does not."""
    keys = tuple(f"{prefix}.{p}_proj.{leaf}" for p in "qkv")
    return Source(keys, ((dim, dim),) * 3,
                  lambda ts: torch.cat([_unpermute_rotate_half(ts[0], num_heads),
                                        _unpermute_rotate_half(ts[1], num_heads), ts[2]]))


_CODEBOOK_NAMES = (("embedding_sum", "cluster_usage", "_initialized"), ("embed_avg", "cluster_size", "inited"))


def mimi_spec_kyutai(config: MimiConfig) -> tuple[Spec, list[str]]:
    """Kyutai's Mimi keys (file or live model). Returns the spec and the patterns of keys present in
    the file that this model does not use (the codebooks beyond num_codebooks)."""
    spec: Spec = {}
    for side, stages in (("encoder", _encoder_stages(config)), ("decoder", _decoder_stages(config))):
        for ours_name, index, kind, shape in stages:
            wrap = "conv.conv" if kind == "conv" else "convtr.convtr"
            theirs = f"{side}.model.{index}.{wrap}"
            spec[f"{side}.{ours_name}.weight"] = [_copy(f"{theirs}.weight", shape)]
            spec[f"{side}.{ours_name}.bias"] = [_copy(f"{theirs}.bias", (shape[0] if kind == "conv" else shape[1],))]
    for side in ("encoder", "decoder"):
        for ours, shapes in _transformer_params(config).items():
            layer_ours = f"{side}_transformer.{ours}"
            theirs = f"{side}_transformer.transformer.{ours}"
            for old, new in (("qkv.weight", "self_attn.in_proj_weight"), ("out.weight", "self_attn.out_proj.weight"),
                             ("fc1", "linear1"), ("fc2", "linear2"), ("scale1", "layer_scale_1.scale"),
                             ("scale2", "layer_scale_2.scale")):
                theirs = theirs.replace(old, new)
            sources = [_copy(theirs, shapes)]
            live = theirs.replace("in_proj_weight", "in_projs.0.weight").replace("out_proj.weight", "out_projs.0.weight")
            if live != theirs:
                sources.append(_copy(live, shapes))
            spec[layer_ours] = sources
    dim, stride = config.dimension, config.steps_per_frame
    spec["downsample.weight"] = [_copy("downsample.conv.conv.conv.weight", (dim, dim, 2 * stride))]
    spec["upsample.weight"] = [_copy("upsample.convtr.convtr.convtr.weight", (dim, 1, 2 * stride))]
    for ours, theirs, count in (("semantic", "rvq_first", config.n_q_semantic),
                                ("acoustic", "rvq_rest", config.num_codebooks - config.n_q_semantic)):
        base = f"quantizer.{theirs}"
        spec[f"quantizer.{ours}.input_proj"] = [_copy(f"{base}.input_proj.weight",
                                                      (config.codebook_dim, dim, 1))]
        spec[f"quantizer.{ours}.output_proj"] = [_copy(f"{base}.output_proj.weight",
                                                       (dim, config.codebook_dim, 1))]
        prefixes = [f"{base}.vq.layers.{i}._codebook" for i in range(count)]
        spec[f"quantizer.{ours}.codebooks"] = [
            _stacked_centroids(prefixes, config.codebook_size, config.codebook_dim, names)
            for names in _CODEBOOK_NAMES]
    unused = [rf"quantizer\.rvq_first\.vq\.layers\.(\d+)\._codebook\.\w+:{config.n_q_semantic}",
              rf"quantizer\.rvq_rest\.vq\.layers\.(\d+)\._codebook\.\w+:{config.num_codebooks - config.n_q_semantic}"]
    return spec, unused


def mimi_spec_hf(config: MimiConfig, prefix: str = "") -> tuple[Spec, list[str]]:
    """transformers' flat Mimi keys (a MimiModel file, or `audio_encoder.` inside a Moshi file)."""
    spec: Spec = {}
    for side, stages in (("encoder", _encoder_stages(config)), ("decoder", _decoder_stages(config))):
        for ours_name, index, kind, shape in stages:
            theirs = f"{prefix}{side}.layers.{index}.conv"
            spec[f"{side}.{ours_name}.weight"] = [_copy(f"{theirs}.weight", shape)]
            spec[f"{side}.{ours_name}.bias"] = [_copy(f"{theirs}.bias", (shape[0] if kind == "conv" else shape[1],))]
    dim, heads = config.dimension, config.num_heads
    for side in ("encoder", "decoder"):
        for i in range(config.num_layers):
            ours, theirs = f"{side}_transformer.layers.{i}", f"{prefix}{side}_transformer.layers.{i}"
            spec[f"{ours}.qkv.weight"] = [_hf_qkv(f"{theirs}.self_attn", dim, heads)]
            pairs = {"out.weight": ("self_attn.o_proj.weight", (dim, dim)),
                     "norm1.weight": ("input_layernorm.weight", (dim,)),
                     "norm1.bias": ("input_layernorm.bias", (dim,)),
                     "norm2.weight": ("post_attention_layernorm.weight", (dim,)),
                     "norm2.bias": ("post_attention_layernorm.bias", (dim,)),
                     "fc1.weight": ("mlp.fc1.weight", (config.dim_feedforward, dim)),
                     "fc2.weight": ("mlp.fc2.weight", (dim, config.dim_feedforward)),
                     "scale1": ("self_attn_layer_scale.scale", (dim,)),
                     "scale2": ("mlp_layer_scale.scale", (dim,))}
            for name, (their_name, shape) in pairs.items():
                spec[f"{ours}.{name}"] = [_copy(f"{theirs}.{their_name}", shape)]
    stride = config.steps_per_frame
    spec["downsample.weight"] = [_copy(f"{prefix}downsample.conv.weight", (dim, dim, 2 * stride))]
    spec["upsample.weight"] = [_copy(f"{prefix}upsample.conv.weight", (dim, 1, 2 * stride))]
    for ours, theirs, count in (("semantic", "semantic_residual_vector_quantizer", config.n_q_semantic),
                                ("acoustic", "acoustic_residual_vector_quantizer",
                                 config.num_codebooks - config.n_q_semantic)):
        base = f"{prefix}quantizer.{theirs}"
        spec[f"quantizer.{ours}.input_proj"] = [_copy(f"{base}.input_proj.weight", (config.codebook_dim, dim, 1))]
        spec[f"quantizer.{ours}.output_proj"] = [_copy(f"{base}.output_proj.weight", (dim, config.codebook_dim, 1))]
        prefixes = [f"{base}.layers.{i}.codebook" for i in range(count)]
        spec[f"quantizer.{ours}.codebooks"] = [_stacked_centroids(
            prefixes, config.codebook_size, config.codebook_dim, ("embed_sum", "cluster_usage", "initialized"))]
    p = re.escape(prefix)
    unused = [rf"{p}quantizer\.semantic_residual_vector_quantizer\.layers\.(\d+)\.codebook\.\w+:{config.n_q_semantic}",
              rf"{p}quantizer\.acoustic_residual_vector_quantizer\.layers\.(\d+)\.codebook\.\w+:"
              rf"{config.num_codebooks - config.n_q_semantic}"]
    return spec, unused


def lm_spec_kyutai(config: LMConfig) -> Spec:
    """Kyutai's LM keys: the released file's names, or a live `LMModel.state_dict()`'s."""
    c = config
    dim, ddim, steps = c.dim, c.depformer_dim, c.dep_q
    spec: Spec = {
        "text_emb.weight": [_copy("text_emb.weight", (c.text_card + 1, dim))],
        "out_norm.weight": [_copy("out_norm.alpha", (1, 1, dim), (dim,))],
        "text_head": [_copy("text_linear.weight", (c.text_card, dim))],
        "depformer.in_proj": [_stack([f"depformer_in.{k}.weight" for k in range(steps)], (ddim, dim))],
        "depformer.text_emb.weight": [_copy("depformer_text_emb.weight", (c.text_card + 1, ddim))],
        "depformer.heads": [_stack([f"linears.{k}.weight" for k in range(steps)], (c.card, ddim))],
    }
    for k in range(c.n_q):
        spec[f"audio_emb.{k}.weight"] = [_copy(f"emb.{k}.weight", (c.card + 1, dim))]
    for k in range(steps - 1):
        spec[f"depformer.audio_emb.{k}.weight"] = [_copy(f"depformer_emb.{k}.weight", (c.card + 1, ddim))]
    for i in range(c.num_layers):
        ours, theirs = f"layers.{i}", f"transformer.layers.{i}"
        spec[f"{ours}.norm1.weight"] = [_copy(f"{theirs}.norm1.alpha", (1, 1, dim), (dim,))]
        spec[f"{ours}.norm2.weight"] = [_copy(f"{theirs}.norm2.alpha", (1, 1, dim), (dim,))]
        spec[f"{ours}.qkv"] = [_copy(f"{theirs}.self_attn.in_proj_weight", (3 * dim, dim)),
                               _copy(f"{theirs}.self_attn.in_projs.0.weight", (3 * dim, dim))]
        spec[f"{ours}.out"] = [_copy(f"{theirs}.self_attn.out_proj.weight", (dim, dim)),
                               _copy(f"{theirs}.self_attn.out_projs.0.weight", (dim, dim))]
        spec[f"{ours}.gate_up"] = [_copy(f"{theirs}.gating.linear_in.weight", (2 * c.hidden, dim))]
        spec[f"{ours}.down"] = [_copy(f"{theirs}.gating.linear_out.weight", (dim, c.hidden))]
    for j in range(c.depformer_num_layers):
        ours, theirs = f"depformer.layers.{j}", f"depformer.layers.{j}"
        spec[f"{ours}.norm1.weight"] = [_copy(f"{theirs}.norm1.alpha", (1, 1, ddim), (ddim,))]
        spec[f"{ours}.norm2.weight"] = [_copy(f"{theirs}.norm2.alpha", (1, 1, ddim), (ddim,))]
        spec[f"{ours}.qkv"] = [
            _copy(f"{theirs}.self_attn.in_proj_weight", (steps * 3 * ddim, ddim), (steps, 3 * ddim, ddim)),
            _stack([f"{theirs}.self_attn.in_projs.{k}.weight" for k in range(steps)], (3 * ddim, ddim))]
        spec[f"{ours}.out"] = [
            _copy(f"{theirs}.self_attn.out_proj.weight", (steps * ddim, ddim), (steps, ddim, ddim)),
            _stack([f"{theirs}.self_attn.out_projs.{k}.weight" for k in range(steps)], (ddim, ddim))]
        spec[f"{ours}.gate_up"] = [_stack([f"{theirs}.gating.{k}.linear_in.weight" for k in range(steps)],
                                          (2 * c.depformer_hidden, ddim))]
        spec[f"{ours}.down"] = [_stack([f"{theirs}.gating.{k}.linear_out.weight" for k in range(steps)],
                                       (ddim, c.depformer_hidden))]
    return spec


def lm_spec_hf(config: LMConfig) -> Spec:
    """transformers' MoshiForConditionalGeneration keys (its `audio_encoder.` keys are Mimi's)."""
    c = config
    dim, ddim, steps = c.dim, c.depformer_dim, c.dep_q
    spec: Spec = {
        "text_emb.weight": [_copy("decoder.model.embed_tokens.weight", (c.text_card + 1, dim))],
        "out_norm.weight": [_copy("decoder.model.norm.weight", (dim,))],
        "text_head": [_copy("decoder.lm_head.weight", (c.text_card, dim))],
        "depformer.in_proj": [_copy("depth_decoder.input_projections.weight", (steps, ddim, dim))],
        "depformer.text_emb.weight": [_copy("depth_decoder.text_embed_tokens.weight", (c.text_card + 1, ddim))],
        "depformer.heads": [_copy("depth_decoder.lm_heads.weight", (steps, c.card, ddim))],
    }
    for k in range(c.n_q):
        spec[f"audio_emb.{k}.weight"] = [_copy(f"embed_tokens.{k}.weight", (c.card + 1, dim))]
    for k in range(steps - 1):
        spec[f"depformer.audio_emb.{k}.weight"] = [_copy(f"depth_decoder.embed_tokens.{k}.weight", (c.card + 1, ddim))]
    for i in range(c.num_layers):
        ours, theirs = f"layers.{i}", f"decoder.model.layers.{i}"
        spec[f"{ours}.norm1.weight"] = [_copy(f"{theirs}.input_layernorm.weight", (dim,))]
        spec[f"{ours}.norm2.weight"] = [_copy(f"{theirs}.post_attention_layernorm.weight", (dim,))]
        spec[f"{ours}.qkv"] = [_hf_qkv(f"{theirs}.self_attn", dim, c.num_heads, "linear.weight")]
        spec[f"{ours}.out"] = [_copy(f"{theirs}.self_attn.o_proj.linear.weight", (dim, dim))]
        spec[f"{ours}.gate_up"] = [_copy(f"{theirs}.mlp.fc1.weight", (2 * c.hidden, dim))]
        spec[f"{ours}.down"] = [_copy(f"{theirs}.mlp.fc2.weight", (dim, c.hidden))]
    for j in range(c.depformer_num_layers):
        ours, theirs = f"depformer.layers.{j}", f"depth_decoder.layers.{j}"
        spec[f"{ours}.norm1.weight"] = [_copy(f"{theirs}.input_layernorm.weight", (ddim,))]
        spec[f"{ours}.norm2.weight"] = [_copy(f"{theirs}.post_attention_layernorm.weight", (ddim,))]
        # The depth decoder has no RoPE, so its q/k rows are stored unpermuted.
        spec[f"{ours}.qkv"] = [Source(tuple(f"{theirs}.self_attn.{p}_proj.linear.weight" for p in "qkv"),
                                      ((steps, ddim, ddim),) * 3, lambda ts: torch.cat(ts, dim=1))]
        spec[f"{ours}.out"] = [_copy(f"{theirs}.self_attn.o_proj.linear.weight", (steps, ddim, ddim))]
        spec[f"{ours}.gate_up"] = [_copy(f"{theirs}.mlp.fc1.weight", (steps, 2 * c.depformer_hidden, ddim))]
        spec[f"{ours}.down"] = [_copy(f"{theirs}.mlp.fc2.weight", (steps, ddim, c.depformer_hidden))]
    return spec


def _encoder_stages(config: MimiConfig):
    """(our name, Kyutai/transformers Sequential index, kind, weight shape) of the SEANet encoder."""
    nf, n = config.n_filters, len(config.ratios)
    hidden = lambda ch: ch // config.compress  # noqa: E731
    rows = [("conv_in", 0, "conv", (nf, config.channels, config.kernel_size))]
    for i, ratio in enumerate(reversed(config.ratios)):
        ch = nf * 2 ** i
        rows += [(f"stages.{i}.res.conv1", f"{1 + 3 * i}.block.1", "conv", (hidden(ch), ch, config.residual_kernel_size)),
                 (f"stages.{i}.res.conv2", f"{1 + 3 * i}.block.3", "conv", (ch, hidden(ch), 1)),
                 (f"stages.{i}.down", 3 + 3 * i, "conv", (2 * ch, ch, 2 * ratio))]
    rows.append(("conv_out", 3 * n + 2, "conv", (config.dimension, nf * 2 ** n, config.last_kernel_size)))
    return rows


def _decoder_stages(config: MimiConfig):
    nf, n = config.n_filters, len(config.ratios)
    top = nf * 2 ** n
    rows = [("conv_in", 0, "conv", (top, config.dimension, config.kernel_size))]
    for i, ratio in enumerate(config.ratios):
        ch = top // 2 ** i
        rows += [(f"stages.{i}.up", 2 + 3 * i, "convtr", (ch, ch // 2, 2 * ratio)),
                 (f"stages.{i}.res.conv1", f"{3 + 3 * i}.block.1", "conv",
                  (ch // 2 // config.compress, ch // 2, config.residual_kernel_size)),
                 (f"stages.{i}.res.conv2", f"{3 + 3 * i}.block.3", "conv", (ch // 2, ch // 2 // config.compress, 1))]
    rows.append(("conv_out", 3 * n + 2, "conv", (config.channels, nf, config.last_kernel_size)))
    return rows


def _transformer_params(config: MimiConfig) -> dict[str, tuple[int, ...]]:
    dim, ff = config.dimension, config.dim_feedforward
    shapes = {"qkv.weight": (3 * dim, dim), "out.weight": (dim, dim), "norm1.weight": (dim,), "norm1.bias": (dim,),
              "norm2.weight": (dim,), "norm2.bias": (dim,), "fc1.weight": (ff, dim), "fc2.weight": (dim, ff),
              "scale1": (dim,), "scale2": (dim,)}
    return {f"layers.{i}.{name}": shape for i in range(config.num_layers) for name, shape in shapes.items()}


class TensorFiles:
    """Read-only view of one safetensors file or a sharded set (an index.json's weight_map)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            path = index if index.exists() else path / "model.safetensors"
        if not path.exists():
            raise CheckpointError(f"checkpoint file not found: {path}")
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path} is not a safetensors index: {e}") from None
            files = {key: path.parent / name for key, name in weight_map.items()}
        else:
            files = None
        self.path = path
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for file in sorted(set(files.values())) if files else [path]:
            handle = self._open(file)
            for key in handle.keys():
                self._file_of[key] = file
        if files:
            missing = sorted(k for k, f in files.items() if self._file_of.get(k) != f)
            if missing:
                raise CheckpointError(f"{path} lists keys its shards do not hold: {_preview(missing)}")

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.exists():
                raise CheckpointError(f"checkpoint shard not found: {file}")
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read {file} as safetensors (corrupt or truncated?): {e}") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[key]).get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        try:
            return self._open(file).get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {file} (corrupt or truncated?): {e}") from None


def _preview(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _is_unused(key: str, unused: Sequence[str]) -> bool:
    for rule in unused:
        pattern, _, first_unused = rule.rpartition(":")
        match = re.fullmatch(pattern, key)
        if match and int(match.group(1)) >= int(first_unused):
            return True
    return False


def resolve(files: TensorFiles, spec: Spec, unused: Sequence[str] = (),
            foreign: Callable[[str], bool] = lambda key: False, what: str = "checkpoint") -> dict[str, Source]:
    """Chooses a source per parameter and validates the whole key set and all shapes at once.

    `unused`: "regex:first" rules for keys the format stores but this model does not use (group 1
    is an index, used from `first` on). `foreign(key)`: the key belongs to another model in the same file.
    """
    present = set(files.keys())
    chosen: dict[str, Source] = {}
    missing: list[str] = []
    for name, alternatives in spec.items():
        source = next((s for s in alternatives if all(k in present for k in s.keys)), None)
        if source is None:
            best = max(alternatives, key=lambda s: sum(k in present for k in s.keys))
            missing += [k for k in best.keys if k not in present]
        else:
            chosen[name] = source
    used = {k for s in chosen.values() for k in s.keys}
    unexpected = sorted(k for k in present - used
                        if not foreign(k) and not _is_unused(k, unused))
    misshaped = []
    for name, source in chosen.items():
        for key, shape in zip(source.keys, source.shapes):
            actual = files.shape(key)
            if actual != shape:
                misshaped.append(f"{key}: {list(actual)} (expected {list(shape)})")
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_preview(sorted(set(missing)))}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_preview(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped: {_preview(misshaped)}")
        raise CheckpointError(f"{what} {files.path} does not match the model config: " + "; ".join(parts))
    return chosen


def materialize(module_factory: Callable[[], nn.Module], files: TensorFiles, sources: dict[str, Source],
                dtype: torch.dtype, device: torch.device | str,
                progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Builds the module on the meta device and assigns every parameter from its source.
    progress(done, total) is called after each parameter."""
    with torch.device("meta"):
        module = module_factory()
    expected = dict(module.named_parameters())
    if set(expected) != set(sources):
        raise AssertionError(f"spec and module disagree: {sorted(set(expected) ^ set(sources))}")
    state = {}
    for name, source in sources.items():
        value = source.combine([files.tensor(k) for k in source.keys])
        if tuple(value.shape) != tuple(expected[name].shape):
            raise AssertionError(f"{name}: built {list(value.shape)}, module wants {list(expected[name].shape)}")
        if not torch.isfinite(value.float()).all():
            raise CheckpointError(f"{files.path}: parameter {name} holds NaN or Inf values")
        state[name] = value.to(device=device, dtype=dtype).contiguous()
        if progress is not None:
            progress(len(state), len(sources))
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


@dataclass(frozen=True)
class MoshiCheckpoint:
    """Where the pieces of a Moshi checkpoint directory are, and in which format."""

    format: str
    """"kyutai" or "hf"."""
    config: MoshiConfig
    lm_file: Path
    mimi_file: Path
    tokenizer_file: Path | None


def find_moshi_checkpoint(directory: str | Path) -> MoshiCheckpoint:
    """A Kyutai-layout directory (config.json with LM kwargs and file names, or the legacy layout
    with none) or a transformers `save_pretrained` directory of MoshiForConditionalGeneration."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"not a checkpoint directory: {directory}")
    fmt, config, raw = load_checkpoint_config(directory)
    if fmt == "hf":
        tokenizer = next((directory / n for n in ("tokenizer.model", KYUTAI_TOKENIZER_FILE)
                          if (directory / n).is_file()), None)
        return MoshiCheckpoint("hf", config, directory, directory, tokenizer)
    tokenizer = directory / raw.get("tokenizer_name", KYUTAI_TOKENIZER_FILE)
    return MoshiCheckpoint("kyutai", config, directory / raw.get("moshi_name", KYUTAI_LM_FILE),
                           directory / raw.get("mimi_name", KYUTAI_MIMI_FILE),
                           tokenizer if tokenizer.is_file() else None)


def load_lm(checkpoint: MoshiCheckpoint, module_factory: Callable[[], nn.Module], dtype: torch.dtype,
            device: torch.device | str, progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """The LM of a checkpoint, built by module_factory() with this engine's parameter names."""
    files = TensorFiles(checkpoint.lm_file)
    if checkpoint.format == "hf":
        sources = resolve(files, lm_spec_hf(checkpoint.config.lm),
                          foreign=lambda key: key.startswith("audio_encoder."), what="Moshi LM checkpoint")
    else:
        sources = resolve(files, lm_spec_kyutai(checkpoint.config.lm), what="Moshi LM checkpoint")
    return materialize(module_factory, files, sources, dtype, device, progress)


def load_mimi(path: str | Path, module_factory: Callable[[MimiConfig], nn.Module], device: torch.device | str,
              num_codebooks: int = 8) -> nn.Module:
    """Mimi from a Kyutai Mimi file, a Kyutai checkpoint directory, a transformers MimiModel
    directory, or a transformers Moshi directory (its `audio_encoder.` weights). Float32."""
    path = Path(path)
    prefix = ""
    if path.is_dir():
        config_file = path / "config.json"
        raw = json.loads(config_file.read_text()) if config_file.exists() else {}
        if raw.get("model_type") == "mimi":
            config, files = MimiConfig.from_hf_dict(raw, num_codebooks=num_codebooks), TensorFiles(path)
        else:
            checkpoint = find_moshi_checkpoint(path)
            config = replace(checkpoint.config.mimi, num_codebooks=num_codebooks)
            files = TensorFiles(checkpoint.mimi_file)
            prefix = "audio_encoder." if checkpoint.format == "hf" else ""
    else:
        config, files = replace(MimiConfig(), num_codebooks=num_codebooks), TensorFiles(path)
    if any(k.startswith(f"{prefix}encoder.layers.") for k in files.keys()):
        spec, unused = mimi_spec_hf(config, prefix)
    else:
        spec, unused = mimi_spec_kyutai(config)
    sources = resolve(files, spec, unused, foreign=lambda key: not key.startswith(prefix), what="Mimi checkpoint")
    return materialize(lambda: module_factory(config), files, sources, torch.float32, device)


def random_init_(module: nn.Module, seed: int) -> nn.Module:
    """Fills every parameter with random, non-zero values of a sensible scale (for timing, demos and
    tests without real weights): matrices and convs N(0, 1/fan_in), embeddings and codebooks N(0, 1),
    norm weights 1 + N(0, 0.05^2), biases N(0, 0.02^2), Mimi's layer scales U(0.05, 0.2)."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("scale1", "scale2"):
                param.uniform_(0.05, 0.2, generator=generator)
            elif leaf == "bias":
                param.normal_(0.0, 0.02, generator=generator)
            elif param.dim() == 1:
                param.normal_(1.0, 0.05, generator=generator)
            elif leaf == "codebooks" or ".text_emb." in f".{name}" or ".audio_emb." in f".{name}":
                param.normal_(0.0, 1.0, generator=generator)
            else:
                fan_in = param.shape[-1] if param.dim() == 2 or not _is_conv(name) else param[0].numel()
                param.normal_(0.0, fan_in ** -0.5, generator=generator)
    return module


def _is_conv(name: str) -> bool:
    return name.startswith(("encoder.", "decoder.", "downsample", "upsample", "quantizer."))
