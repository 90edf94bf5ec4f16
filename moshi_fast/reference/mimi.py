"""Mimi, the streaming neural codec, in eager PyTorch: the executable spec of the fast codec.

One frame is `frame_size` (1920) samples at 24 kHz, and `num_codebooks` (8) codes per frame.

    encode  pcm [B, 1, 1920] -> SEANet encoder -> [B, 512, 2] (25 Hz) -> transformer (ring KV)
            -> downsample conv (k4 s2, replicate first-frame padding) -> latent [B, 512, 1]
            -> split RVQ: 1 semantic + 7 acoustic codebooks, both from the same latent -> codes [B, 8, 1]
    decode  codes [B, 8, 1] -> RVQ sums + output projections -> [B, 512, 1] -> depthwise convtr (k4 s2)
            -> transformer (ring KV) -> SEANet decoder -> pcm [B, 1, 1920]

Streaming state (Kyutai's `StreamingConv1d`, `StreamingConvTranspose1d`, `RingKVCache`) is explicit:
`init_encoder_state` / `init_decoder_state` build a `SlotState`; every step takes an `exec_mask`
[B] and leaves non-executing slots untouched. A whole signal is the same computation frame by frame.
Parameter names are this engine's; `moshi_fast.weights` maps Kyutai and transformers checkpoints onto them.
Runs in float32 like Kyutai's Mimi.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MimiConfig
from .attention import add_ring, attend, merge_heads, ring_write, rope_interleaved, split_heads
from .state import SlotState


class CausalConv1d(nn.Module):
    """Conv1d over [B, C_in, T] with the last (kernel - stride) input samples carried between calls.

    The carried history starts at zeros (causal zero padding), or with `replicate` at copies of the
    first sample of the first call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = True, replicate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.stride = stride
        self.replicate = replicate
        self.history = kernel_size - stride

    def init_state(self, state: SlotState, name: str) -> None:
        if self.history:
            state.add(f"{name}.previous", self.weight.new_empty(state.batch_size, self.weight.shape[1], self.history))
            if self.replicate:
                state.add(f"{name}.first", torch.empty(state.batch_size, dtype=torch.bool,
                                                       device=self.weight.device), True)

    def forward(self, x: torch.Tensor, state: SlotState, name: str, exec_mask: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.stride:
            raise ValueError(f"streaming conv input length {x.shape[-1]} is not a multiple of its stride")
        if self.history:
            previous = state[f"{name}.previous"]
            if self.replicate:
                first = state[f"{name}.first"].view(-1, 1, 1)
                previous = torch.where(first, x[..., :1].expand_as(previous), previous)
                state.commit(f"{name}.first", torch.zeros_like(state[f"{name}.first"]), exec_mask)
            x = torch.cat([previous, x], dim=-1)
            state.commit(f"{name}.previous", x[..., -self.history:], exec_mask)
        return F.conv1d(x, self.weight, self.bias, stride=self.stride)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d over [B, C_in, T] -> [B, C_out, T * stride] with the overlapping tail
    (kernel - stride samples) carried into the next call. The carried tail has the bias removed,
    since the next call's output adds it again."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.stride = stride
        self.groups = groups
        self.overlap = kernel_size - stride
        self.out_channels = out_channels

    def init_state(self, state: SlotState, name: str) -> None:
        state.add(f"{name}.partial", self.weight.new_empty(state.batch_size, self.out_channels, self.overlap))

    def forward(self, x: torch.Tensor, state: SlotState, name: str, exec_mask: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose1d(x, self.weight, self.bias, stride=self.stride, groups=self.groups)
        overlap = self.overlap
        head = y[..., :overlap] + state[f"{name}.partial"]
        tail = y[..., -overlap:]
        if self.bias is not None:
            tail = tail - self.bias[:, None]
        state.commit(f"{name}.partial", tail, exec_mask)
        return torch.cat([head, y[..., overlap:-overlap]], dim=-1)


class ResidualBlock(nn.Module):
    """x + conv2(ELU(conv1(ELU(x)))), conv1: C -> C/compress (k=residual_kernel_size), conv2: k=1."""

    def __init__(self, channels: int, hidden: int, kernel_size: int):
        super().__init__()
        self.conv1 = CausalConv1d(channels, hidden, kernel_size)
        self.conv2 = CausalConv1d(hidden, channels, 1)

    def init_state(self, state: SlotState, name: str) -> None:
        self.conv1.init_state(state, f"{name}.conv1")
        self.conv2.init_state(state, f"{name}.conv2")

    def forward(self, x, state, name, exec_mask):
        y = self.conv1(F.elu(x), state, f"{name}.conv1", exec_mask)
        y = self.conv2(F.elu(y), state, f"{name}.conv2", exec_mask)
        return x + y


class EncoderStage(nn.Module):
    def __init__(self, channels: int, ratio: int, config: MimiConfig):
        super().__init__()
        self.res = ResidualBlock(channels, channels // config.compress, config.residual_kernel_size)
        self.down = CausalConv1d(channels, 2 * channels, 2 * ratio, stride=ratio)


class DecoderStage(nn.Module):
    def __init__(self, channels: int, ratio: int, config: MimiConfig):
        super().__init__()
        self.up = CausalConvTranspose1d(channels, channels // 2, 2 * ratio, stride=ratio)
        self.res = ResidualBlock(channels // 2, channels // 2 // config.compress, config.residual_kernel_size)


class SEANetEncoder(nn.Module):
    """[B, 1, T] -> [B, dimension, T / hop_length]."""

    def __init__(self, config: MimiConfig):
        super().__init__()
        self.conv_in = CausalConv1d(config.channels, config.n_filters, config.kernel_size)
        self.stages = nn.ModuleList(
            EncoderStage(config.n_filters * 2 ** i, ratio, config) for i, ratio in enumerate(reversed(config.ratios)))
        top = config.n_filters * 2 ** len(config.ratios)
        self.conv_out = CausalConv1d(top, config.dimension, config.last_kernel_size)

    def init_state(self, state: SlotState, name: str) -> None:
        self.conv_in.init_state(state, f"{name}.conv_in")
        for i, stage in enumerate(self.stages):
            stage.res.init_state(state, f"{name}.stages.{i}.res")
            stage.down.init_state(state, f"{name}.stages.{i}.down")
        self.conv_out.init_state(state, f"{name}.conv_out")

    def forward(self, x, state, name, exec_mask):
        x = self.conv_in(x, state, f"{name}.conv_in", exec_mask)
        for i, stage in enumerate(self.stages):
            x = stage.res(x, state, f"{name}.stages.{i}.res", exec_mask)
            x = stage.down(F.elu(x), state, f"{name}.stages.{i}.down", exec_mask)
        return self.conv_out(F.elu(x), state, f"{name}.conv_out", exec_mask)


class SEANetDecoder(nn.Module):
    """[B, dimension, T] -> [B, 1, T * hop_length]."""

    def __init__(self, config: MimiConfig):
        super().__init__()
        top = config.n_filters * 2 ** len(config.ratios)
        self.conv_in = CausalConv1d(config.dimension, top, config.kernel_size)
        self.stages = nn.ModuleList(
            DecoderStage(top // 2 ** i, ratio, config) for i, ratio in enumerate(config.ratios))
        self.conv_out = CausalConv1d(config.n_filters, config.channels, config.last_kernel_size)

    def init_state(self, state: SlotState, name: str) -> None:
        self.conv_in.init_state(state, f"{name}.conv_in")
        for i, stage in enumerate(self.stages):
            stage.up.init_state(state, f"{name}.stages.{i}.up")
            stage.res.init_state(state, f"{name}.stages.{i}.res")
        self.conv_out.init_state(state, f"{name}.conv_out")

    def forward(self, x, state, name, exec_mask):
        x = self.conv_in(x, state, f"{name}.conv_in", exec_mask)
        for i, stage in enumerate(self.stages):
            x = stage.up(F.elu(x), state, f"{name}.stages.{i}.up", exec_mask)
            x = stage.res(x, state, f"{name}.stages.{i}.res", exec_mask)
        return self.conv_out(F.elu(x), state, f"{name}.conv_out", exec_mask)


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + scale1 * attn(LN(x)); x + scale2 * fc2(gelu(fc1(LN(x)))). No biases but LN's."""

    def __init__(self, config: MimiConfig):
        super().__init__()
        dim = config.dimension
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.scale1 = nn.Parameter(torch.empty(dim))
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.fc1 = nn.Linear(dim, config.dim_feedforward, bias=False)
        self.fc2 = nn.Linear(config.dim_feedforward, dim, bias=False)
        self.scale2 = nn.Parameter(torch.empty(dim))


class Transformer(nn.Module):
    """Streaming transformer over [B, T, dimension] with RoPE at absolute positions and a ring KV
    cache of `context` steps per layer."""

    def __init__(self, config: MimiConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))

    def init_state(self, state: SlotState, name: str) -> None:
        c = self.config
        device = self.layers[0].qkv.weight.device
        state.add(f"{name}.offset", torch.empty(state.batch_size, dtype=torch.long, device=device))
        for i in range(c.num_layers):
            add_ring(state, f"{name}.layers.{i}", c.num_heads, c.context, c.head_dim, torch.float32, device)

    def forward(self, x, state, name, exec_mask):
        c = self.config
        offset = state[f"{name}.offset"]
        positions = offset[:, None] + torch.arange(x.shape[1], device=x.device)
        for i, layer in enumerate(self.layers):
            q, k, v = split_heads(layer.qkv(layer.norm1(x)), c.num_heads)
            q = rope_interleaved(q, positions, c.max_period)
            k = rope_interleaved(k, positions, c.max_period)
            ring_k, ring_v, ring_pos = ring_write(state, f"{name}.layers.{i}", k, v, positions, exec_mask)
            update = layer.out(merge_heads(attend(q, ring_k, ring_v, positions, ring_pos, c.context)))
            x = x + layer.scale1 * update
            update = layer.fc2(F.gelu(layer.fc1(layer.norm2(x))))
            x = x + layer.scale2 * update
        state.commit(f"{name}.offset", offset + x.shape[1], exec_mask)
        return x


class RVQ(nn.Module):
    """Residual VQ: 1x1 input projection, nearest codeword (Euclidean) per level with residual
    updates, and the output projection of the summed codewords."""

    def __init__(self, config: MimiConfig, num_codebooks: int):
        super().__init__()
        self.input_proj = nn.Parameter(torch.empty(config.codebook_dim, config.dimension, 1))
        self.output_proj = nn.Parameter(torch.empty(config.dimension, config.codebook_dim, 1))
        self.codebooks = nn.Parameter(torch.empty(num_codebooks, config.codebook_size, config.codebook_dim))

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, dimension, T] -> codes [B, K, T]."""
        residual = F.conv1d(latent, self.input_proj)
        codes = []
        for codebook in self.codebooks:
            vectors = residual.transpose(1, 2)
            flat = vectors.reshape(-1, vectors.shape[-1])
            index = torch.cdist(flat[None], codebook[None], p=2)[0].argmin(-1).view(vectors.shape[:-1])
            residual = residual - F.embedding(index, codebook).transpose(1, 2)
            codes.append(index)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> [B, dimension, T]."""
        quantized = 0
        for level, codebook in enumerate(self.codebooks):
            quantized = quantized + F.embedding(codes[:, level], codebook)
        return F.conv1d(quantized.transpose(1, 2), self.output_proj)


class SplitRVQ(nn.Module):
    """Semantic RVQ (n_q_semantic codebooks) and acoustic RVQ (the rest), each with its own
    projections, both reading the same latent; decode sums both."""

    def __init__(self, config: MimiConfig):
        super().__init__()
        self.semantic = RVQ(config, config.n_q_semantic)
        self.acoustic = RVQ(config, config.num_codebooks - config.n_q_semantic)

    def encode(self, latent):
        return torch.cat([self.semantic.encode(latent), self.acoustic.encode(latent)], dim=1)

    def decode(self, codes):
        split = self.semantic.codebooks.shape[0]
        return self.semantic.decode(codes[:, :split]) + self.acoustic.decode(codes[:, split:])


class Mimi(nn.Module):
    """The codec. `encode_step` / `decode_step` process one or more whole frames with carried state."""

    def __init__(self, config: MimiConfig):
        super().__init__()
        self.config = config
        dim, stride = config.dimension, config.steps_per_frame
        self.encoder = SEANetEncoder(config)
        self.encoder_transformer = Transformer(config)
        self.downsample = CausalConv1d(dim, dim, 2 * stride, stride=stride, bias=False, replicate=True)
        self.quantizer = SplitRVQ(config)
        self.upsample = CausalConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim, bias=False)
        self.decoder_transformer = Transformer(config)
        self.decoder = SEANetDecoder(config)

    def init_encoder_state(self, batch_size: int) -> SlotState:
        state = SlotState(batch_size)
        self.encoder.init_state(state, "encoder")
        self.encoder_transformer.init_state(state, "encoder_transformer")
        self.downsample.init_state(state, "downsample")
        return state

    def init_decoder_state(self, batch_size: int) -> SlotState:
        state = SlotState(batch_size)
        self.upsample.init_state(state, "upsample")
        self.decoder_transformer.init_state(state, "decoder_transformer")
        self.decoder.init_state(state, "decoder")
        return state

    def encode_latent_step(self, pcm: torch.Tensor, state: SlotState, exec_mask: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, n * frame_size] -> unquantized latent [B, dimension, n]."""
        x = self.encoder(pcm, state, "encoder", exec_mask)
        x = self.encoder_transformer(x.transpose(1, 2), state, "encoder_transformer", exec_mask).transpose(1, 2)
        return self.downsample(x, state, "downsample", exec_mask)

    def encode_step(self, pcm: torch.Tensor, state: SlotState, exec_mask: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, n * frame_size] float32 -> codes [B, num_codebooks, n] int64."""
        return self.quantizer.encode(self.encode_latent_step(pcm, state, exec_mask))

    def decode_step(self, codes: torch.Tensor, state: SlotState, exec_mask: torch.Tensor) -> torch.Tensor:
        """codes [B, num_codebooks, n] -> pcm [B, 1, n * frame_size] float32."""
        x = self.upsample(self.quantizer.decode(codes), state, "upsample", exec_mask)
        x = self.decoder_transformer(x.transpose(1, 2), state, "decoder_transformer", exec_mask).transpose(1, 2)
        return self.decoder(x, state, "decoder", exec_mask)
