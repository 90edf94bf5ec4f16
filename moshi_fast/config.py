"""Model configurations: frozen dataclasses for Mimi and the Moshi LM, with the real and a tiny preset.

`MimiConfig` describes the codec (SEANet + two streaming transformers + split RVQ), `LMConfig` the
Helium temporal transformer and the depth transformer ("depformer"), `MoshiConfig` the pair.
`moshiko()` is Kyutai's released configuration (identical for moshiko and moshika); `tiny()` keeps
every structural feature at toy widths for CPU tests and the CPU demo.

Kyutai's `config.json` (the keys of its LM kwargs plus `moshi_name`, `mimi_name`, `tokenizer_name`,
`lm_gen_config`) and transformers' `config.json` (`model_type` "moshi" or "mimi") are both read here;
`load_checkpoint_config(directory)` picks the right one.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Kyutai's file names inside a checkpoint directory (moshi/models/loaders.py).
KYUTAI_LM_FILE = "model.safetensors"
KYUTAI_MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
KYUTAI_TOKENIZER_FILE = "tokenizer_spm_32k_3.model"


class ConfigError(ValueError):
    """A configuration that this engine cannot run (unsupported architecture or inconsistent values)."""


@dataclass(frozen=True)
class MimiConfig:
    """Mimi codec. Audio at `sample_rate`, one frame of `frame_size` samples per `num_codebooks` codes.

    SEANet: `ratios` are the decoder's upsampling ratios; the encoder downsamples by them reversed.
    Every resolution stage has one residual block (k=`residual_kernel_size`, then k=1, channels / `compress`).
    Transformers: both run at the encoder frame rate (sample_rate / prod(ratios)) on `dimension` channels,
    with a ring KV cache of `context` steps. Quantizer: 1 semantic + (num_codebooks - 1) acoustic codebooks
    of `codebook_size` x `codebook_dim`; a checkpoint stores `total_codebooks`.
    """

    sample_rate: int = 24000
    frame_rate: float = 12.5
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    compress: int = 2
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10000.0
    norm_eps: float = 1e-5
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_codebooks: int = 8
    total_codebooks: int = 32
    n_q_semantic: int = 1

    def __post_init__(self):
        if self.channels != 1:
            raise ConfigError(f"only mono Mimi is supported, got channels={self.channels}")
        if self.sample_rate % self.hop_length:
            raise ConfigError("sample_rate must be a multiple of the SEANet hop length")
        if self.frame_size * self.frame_rate != self.sample_rate:
            raise ConfigError(f"sample_rate {self.sample_rate} is not a whole number of frames at {self.frame_rate} Hz")
        if self.frame_size % self.hop_length:
            raise ConfigError("a Mimi frame must hold a whole number of encoder steps")
        if self.dimension % self.num_heads:
            raise ConfigError("dimension must be divisible by num_heads")
        if not 1 <= self.n_q_semantic < self.num_codebooks <= self.total_codebooks:
            raise ConfigError("need 1 <= n_q_semantic < num_codebooks <= total_codebooks")

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_size(self) -> int:
        return int(round(self.sample_rate / self.frame_rate))

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def steps_per_frame(self) -> int:
        """Encoder-rate steps per codec frame; also the stride of the down/upsampling convs."""
        return self.frame_size // self.hop_length

    @property
    def head_dim(self) -> int:
        return self.dimension // self.num_heads

    @staticmethod
    def from_kyutai_dict(config: dict[str, Any], num_codebooks: int = 8) -> "MimiConfig":
        """Kyutai's Mimi config dict: {sample_rate, channels, frame_rate, seanet, quantizer, transformer}."""
        seanet, quantizer, transformer = config["seanet"], config["quantizer"], config["transformer"]
        _require(seanet, {"causal": True, "n_residual_layers": 1, "activation": "ELU", "norm": "none",
                          "pad_mode": "constant", "true_skip": True, "disable_norm_outer_blocks": 0}, "seanet")
        _require(transformer, {"causal": True, "gating": "none", "norm": "layer_norm",
                               "positional_embedding": "rope", "conv_layout": True}, "transformer")
        if transformer["d_model"] != seanet["dimension"] or quantizer["input_dimension"] != seanet["dimension"]:
            raise ConfigError("Mimi transformer/quantizer width must equal the SEANet dimension")
        return MimiConfig(
            sample_rate=int(config["sample_rate"]), frame_rate=float(config["frame_rate"]),
            channels=int(config["channels"]), dimension=seanet["dimension"], n_filters=seanet["n_filters"],
            ratios=tuple(seanet["ratios"]), kernel_size=seanet["kernel_size"],
            residual_kernel_size=seanet["residual_kernel_size"], last_kernel_size=seanet["last_kernel_size"],
            compress=seanet["compress"], num_heads=transformer["num_heads"], num_layers=transformer["num_layers"],
            dim_feedforward=transformer["dim_feedforward"], context=transformer["context"],
            max_period=float(transformer["max_period"]), codebook_size=quantizer["bins"],
            codebook_dim=quantizer["dimension"], num_codebooks=num_codebooks, total_codebooks=quantizer["n_q"],
            n_q_semantic=quantizer.get("n_q_semantic", 1),
        )

    def to_kyutai_dict(self) -> dict[str, Any]:
        """The dict Kyutai's `loaders.get_mimi(..., mimi_config=...)` takes."""
        return {
            "sample_rate": self.sample_rate, "channels": self.channels, "frame_rate": self.frame_rate,
            "seanet": {
                "channels": self.channels, "dimension": self.dimension, "causal": True,
                "n_filters": self.n_filters, "n_residual_layers": 1, "activation": "ELU",
                "compress": self.compress, "dilation_base": 2, "disable_norm_outer_blocks": 0,
                "kernel_size": self.kernel_size, "residual_kernel_size": self.residual_kernel_size,
                "last_kernel_size": self.last_kernel_size, "norm": "none", "pad_mode": "constant",
                "ratios": list(self.ratios), "true_skip": True,
            },
            "quantizer": {
                "dimension": self.codebook_dim, "n_q": self.total_codebooks, "bins": self.codebook_size,
                "input_dimension": self.dimension, "output_dimension": self.dimension,
                "n_q_semantic": self.n_q_semantic,
            },
            "transformer": {
                "d_model": self.dimension, "num_heads": self.num_heads, "num_layers": self.num_layers,
                "causal": True, "layer_scale": 0.01, "context": self.context, "conv_layout": True,
                "max_period": self.max_period, "gating": "none", "norm": "layer_norm",
                "positional_embedding": "rope", "dim_feedforward": self.dim_feedforward,
                "input_dimension": self.dimension, "output_dimensions": [self.dimension],
            },
        }

    @staticmethod
    def from_hf_dict(config: dict[str, Any], num_codebooks: int = 8) -> "MimiConfig":
        """transformers' `MimiConfig.to_dict()` (config.json of a MimiModel, or Moshi's audio_encoder_config)."""
        _require(config, {"use_causal_conv": True, "pad_mode": "constant", "num_residual_layers": 1,
                          "use_conv_shortcut": False, "trim_right_ratio": 1.0, "hidden_act": "gelu"}, "mimi")
        if config.get("num_key_value_heads", config["num_attention_heads"]) != config["num_attention_heads"]:
            raise ConfigError("Mimi with grouped-query attention is not supported")
        if config.get("audio_channels", 1) != 1:
            raise ConfigError("only mono Mimi is supported")
        rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
        hop = math.prod(config["upsampling_ratios"])
        frame_size = hop * 2
        frame_rate = config["sampling_rate"] / frame_size
        if config.get("upsample_groups", config["hidden_size"]) != config["hidden_size"]:
            raise ConfigError("only the depthwise (channel-wise) Mimi upsampling is supported")
        return MimiConfig(
            sample_rate=config["sampling_rate"], frame_rate=frame_rate, dimension=config["hidden_size"],
            n_filters=config["num_filters"], ratios=tuple(config["upsampling_ratios"]),
            kernel_size=config["kernel_size"], residual_kernel_size=config["residual_kernel_size"],
            last_kernel_size=config["last_kernel_size"], compress=config["compress"],
            num_heads=config["num_attention_heads"], num_layers=config["num_hidden_layers"],
            dim_feedforward=config["intermediate_size"], context=config["sliding_window"],
            max_period=float(rope_theta), norm_eps=config["norm_eps"], codebook_size=config["codebook_size"],
            codebook_dim=config["codebook_dim"], num_codebooks=num_codebooks,
            total_codebooks=config["num_quantizers"], n_q_semantic=config["num_semantic_quantizers"],
        )


@dataclass(frozen=True)
class LMConfig:
    """The Moshi LM: Helium temporal transformer over 1 text + `n_q` audio streams, and the depth
    transformer that emits `dep_q` audio codebooks per frame with per-codebook weights.

    `hidden` and `depformer_hidden` are the SiLU-gated FFN widths (the input projection is 2 x hidden,
    gate first). `delays` has 1 + n_q entries: text, Moshi's dep_q codebooks, then the user's.
    """

    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden: int = 11264
    context: int = 3000
    max_period: float = 10000.0
    norm_eps: float = 1e-8
    text_card: int = 32000
    card: int = 2048
    n_q: int = 16
    dep_q: int = 8
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    text_padding_id: int = 3
    text_end_padding_id: int = 0
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_hidden: int = 2816

    def __post_init__(self):
        if len(self.delays) != 1 + self.n_q:
            raise ConfigError(f"expected {1 + self.n_q} delays, got {len(self.delays)}")
        if self.n_q != 2 * self.dep_q:
            raise ConfigError("the duplex Moshi LM models dep_q own + dep_q user audio streams (n_q = 2 dep_q)")
        if self.dim % self.num_heads or self.depformer_dim % self.depformer_num_heads:
            raise ConfigError("model widths must be divisible by their head counts")
        if (self.dim // self.num_heads) % 2:
            raise ConfigError("RoPE needs an even head dimension")
        if min(self.delays) < 0:
            raise ConfigError("delays must be non-negative")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def depformer_head_dim(self) -> int:
        return self.depformer_dim // self.depformer_num_heads

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def num_streams(self) -> int:
        return 1 + self.n_q

    @property
    def text_initial_token(self) -> int:
        return self.text_card

    @property
    def audio_initial_token(self) -> int:
        return self.card

    @staticmethod
    def from_kyutai_dict(lm_kwargs: dict[str, Any]) -> "LMConfig":
        """Kyutai's LM kwargs (its config.json minus the file-name keys)."""
        expected = {"gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope", "causal": True,
                    "layer_scale": None, "depformer_multi_linear": True, "depformer_weights_per_step": True,
                    "depformer_pos_emb": "none", "depformer_gating": "silu", "depformer_layer_scale": None,
                    "norm_emb": False, "bias_proj": False, "demux_second_text_stream": False,
                    "demux_second_stream": False, "depformer_weights_per_step_schedule": None,
                    "depformer_low_rank_embeddings": None, "text_card_out": None, "kv_repeat": 1,
                    "conditioners": None, "fuser": None, "cross_attention": False, "depformer_norm": None,
                    "quantize": False, "lora": False}
        _require(lm_kwargs, expected, "lm", optional=True)
        dim, dep_dim = lm_kwargs["dim"], lm_kwargs["depformer_dim"]
        hidden_scale = lm_kwargs.get("hidden_scale", 4)
        dep_ff = lm_kwargs.get("depformer_dim_feedforward") or int(hidden_scale * dep_dim)
        return LMConfig(
            dim=dim, num_heads=lm_kwargs["num_heads"], num_layers=lm_kwargs["num_layers"],
            hidden=_gated_hidden(dim, int(hidden_scale * dim)), context=lm_kwargs["context"],
            max_period=float(lm_kwargs.get("max_period", 10000)), text_card=lm_kwargs["text_card"],
            card=lm_kwargs["card"], n_q=lm_kwargs["n_q"], dep_q=lm_kwargs["dep_q"],
            delays=tuple(lm_kwargs["delays"]), text_padding_id=lm_kwargs.get("existing_text_padding_id", 3),
            text_end_padding_id=lm_kwargs.get("existing_text_end_padding_id", 0),
            depformer_dim=dep_dim, depformer_num_heads=lm_kwargs["depformer_num_heads"],
            depformer_num_layers=lm_kwargs["depformer_num_layers"],
            depformer_hidden=_gated_hidden(dep_dim, dep_ff),
        )

    def to_kyutai_dict(self) -> dict[str, Any]:
        """LM kwargs for Kyutai's `loaders.get_moshi_lm(..., lm_kwargs=...)` that build this architecture."""
        return {
            "dim": self.dim, "text_card": self.text_card, "existing_text_padding_id": self.text_padding_id,
            "n_q": self.n_q, "dep_q": self.dep_q, "card": self.card, "num_heads": self.num_heads,
            "num_layers": self.num_layers, "hidden_scale": _hidden_scale_for(self.dim, self.hidden),
            "causal": True, "layer_scale": None, "context": self.context, "max_period": self.max_period,
            "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
            "depformer_dim": self.depformer_dim,
            "depformer_dim_feedforward": _feedforward_for(self.depformer_dim, self.depformer_hidden),
            "depformer_num_heads": self.depformer_num_heads, "depformer_num_layers": self.depformer_num_layers,
            "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": self.dep_q,
            "depformer_max_period": self.max_period, "depformer_gating": "silu", "depformer_pos_emb": "none",
            "depformer_weights_per_step": True, "delays": list(self.delays),
        }

    @staticmethod
    def from_hf_dict(config: dict[str, Any]) -> "LMConfig":
        """transformers' `MoshiConfig.to_dict()`. Its delay pattern is fixed: semantic 0, acoustic 1."""
        depth = config["depth_decoder_config"]
        for name, cfg in (("moshi", config), ("moshi depth decoder", depth)):
            if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]:
                raise ConfigError(f"{name} with grouped-query attention is not supported")
            if cfg.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"{name}: only the SiLU-gated FFN is supported")
        dep_q = config["num_codebooks"]
        rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
        audio_delays = (0,) + (1,) * (dep_q - 1)
        return LMConfig(
            dim=config["hidden_size"], num_heads=config["num_attention_heads"],
            num_layers=config["num_hidden_layers"], hidden=config["ffn_dim"] // 2,
            context=config.get("sliding_window") or config["max_position_embeddings"],
            max_period=float(rope_theta), norm_eps=config["rms_norm_eps"], text_card=config["vocab_size"],
            card=config.get("audio_vocab_size") or config["audio_encoder_config"]["codebook_size"],
            n_q=2 * dep_q, dep_q=dep_q, delays=(0,) + audio_delays + audio_delays,
            depformer_dim=depth["hidden_size"], depformer_num_heads=depth["num_attention_heads"],
            depformer_num_layers=depth["num_hidden_layers"], depformer_hidden=depth["ffn_dim"] // 2,
        )


@dataclass(frozen=True)
class MoshiConfig:
    """The whole model: the LM, its codec, and the default generation parameters."""

    lm: LMConfig = field(default_factory=LMConfig)
    mimi: MimiConfig = field(default_factory=MimiConfig)
    lm_gen: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if self.lm.card != self.mimi.codebook_size:
            raise ConfigError(f"LM audio cardinality {self.lm.card} != Mimi codebook size {self.mimi.codebook_size}")
        if self.lm.dep_q > self.mimi.num_codebooks:
            raise ConfigError(f"the LM needs {self.lm.dep_q} codebooks, Mimi encodes {self.mimi.num_codebooks}")

    def replace(self, **changes) -> "MoshiConfig":
        return dataclasses.replace(self, **changes)


def moshiko() -> MoshiConfig:
    """Kyutai's released Moshi 7B (moshiko and moshika share it) with its Mimi codec."""
    return MoshiConfig()


def tiny() -> MoshiConfig:
    """Every structural feature of moshiko at toy widths: CPU tests and the CPU demo."""
    lm = LMConfig(dim=64, num_heads=4, num_layers=2, hidden=176, context=3000, text_card=512,
                  depformer_dim=32, depformer_num_heads=2, depformer_num_layers=2, depformer_hidden=88)
    mimi = MimiConfig(dimension=32, n_filters=4, num_heads=2, num_layers=2, dim_feedforward=64,
                      codebook_dim=16, total_codebooks=8)
    return MoshiConfig(lm=lm, mimi=mimi)


PRESETS = {"moshiko": moshiko, "tiny": tiny}


def load_checkpoint_config(directory: str | Path) -> tuple[str, MoshiConfig, dict[str, Any]]:
    """Reads the config of a checkpoint directory.

    Returns (format, config, raw) with format "kyutai" or "hf". A Kyutai directory without
    config.json is the legacy moshiko layout and gets moshiko defaults.
    """
    directory = Path(directory)
    path = directory / "config.json"
    if not path.exists():
        return "kyutai", moshiko(), {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if raw.get("model_type") == "moshi":
        mimi = MimiConfig.from_hf_dict(raw["audio_encoder_config"], num_codebooks=raw["num_codebooks"])
        return "hf", MoshiConfig(lm=LMConfig.from_hf_dict(raw), mimi=mimi), raw
    if raw.get("model_type") == "mimi":
        raise ConfigError(f"{directory} holds a Mimi codec alone; load it with MimiCodec.from_pretrained")
    lm_kwargs = {k: v for k, v in raw.items()
                 if k not in ("moshi_name", "mimi_name", "tokenizer_name", "lm_gen_config", "mimi_config_name",
                              "model_type", "model_id", "lora_name")}
    if raw.get("model_type", "moshi") != "moshi":
        raise ConfigError(f"unsupported Kyutai model_type {raw['model_type']!r} (only 'moshi')")
    lm = LMConfig.from_kyutai_dict(lm_kwargs)
    num_codebooks = max(lm.dep_q, lm.n_q - lm.dep_q)
    if raw.get("mimi_config_name"):
        mimi_raw = json.loads((directory / raw["mimi_config_name"]).read_text())
        mimi = MimiConfig.from_kyutai_dict(mimi_raw, num_codebooks=num_codebooks)
    else:
        mimi = dataclasses.replace(MimiConfig(), num_codebooks=num_codebooks)
    return "kyutai", MoshiConfig(lm=lm, mimi=mimi, lm_gen=dict(raw.get("lm_gen_config") or {})), raw


def _gated_hidden(dim: int, dim_feedforward: int) -> int:
    # Kyutai's ActivationGating rule (moshi/modules/gating.py).
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


def _feedforward_for(dim: int, hidden: int) -> int:
    """A Kyutai dim_feedforward whose gating rule yields `hidden`."""
    if hidden == (21 * dim) // 8:
        return 4 * dim
    for dim_feedforward in (hidden * 3 // 2, hidden * 3 // 2 + 1):
        if _gated_hidden(dim, dim_feedforward) == hidden:
            return dim_feedforward
    raise ConfigError(f"no Kyutai dim_feedforward gives a gated hidden size of {hidden}")


def _hidden_scale_for(dim: int, hidden: int) -> float:
    dim_feedforward = _feedforward_for(dim, hidden)
    if int((dim_feedforward / dim) * dim) != dim_feedforward:
        raise ConfigError(f"hidden size {hidden} has no exact Kyutai hidden_scale at dim {dim}")
    return dim_feedforward / dim


def _require(config: dict[str, Any], expected: dict[str, Any], what: str, optional: bool = False) -> None:
    """Rejects configs that name architecture variants this engine does not implement."""
    bad = []
    for key, value in expected.items():
        if key not in config:
            if not optional:
                bad.append(f"{key} missing (expected {value!r})")
            continue
        if config[key] != value and not (isinstance(value, bool) and value is False and not config[key]):
            bad.append(f"{key}={config[key]!r} (supported: {value!r})")
    if bad:
        raise ConfigError(f"unsupported {what} configuration: " + "; ".join(bad))
