"""Streaming state of the fast models: device tensors allocated once per batch size, no allocation per frame.

Mimi (`MimiCache`): per slot and direction a frame counter; per streaming conv its input history
[2, B, C_in, K - S] and per transposed conv its overlap [2, B, C_out, K - S], both double-buffered
by the parity of the frame counter (kernels read one buffer and write the other); per transformer
layer a ring of keys and values [B, H, context, D]; one split-K workspace shared by every kernel of
both directions (they run one after another on one stream), sized for the largest need. Reset of a
slot zeroes its histories and overlaps and its counters; the rings need no clearing, since a counter
of 0 makes every old entry invisible.
"""
from __future__ import annotations

import torch

from . import ops
from .reference.mimi import CausalConv1d, CausalConvTranspose1d


class MimiCache:
    def __init__(self, model, batch_size: int, device: torch.device):
        """model: a FastMimi (its `streaming_input_lengths()` plan the split workspace)."""
        config = model.config
        self.batch_size = batch_size
        self.encoder_frame = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.decoder_frame = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.history: dict[str, torch.Tensor] = {}
        self.overlap: dict[str, torch.Tensor] = {}
        lengths = model.streaming_input_lengths()
        steps = lengths["encoder.conv_out"]
        rows = batch_size * steps
        needs = [ops.ring_attention_workspace_size(batch_size, config.num_heads, steps, config.head_dim,
                                                   config.context)]
        needs += [ops.linear_workspace_size(rows, n, k, torch.float32) for n, k in (
            (3 * config.dimension, config.dimension), (config.dimension, config.dimension),
            (config.dim_feedforward, config.dimension), (config.dimension, config.dim_feedforward))]
        for name, module in model.named_modules():
            # k = 1 convs get an empty history: one kernel and one lookup for every conv.
            if isinstance(module, CausalConv1d):
                self.history[name] = torch.zeros(2, batch_size, module.weight.shape[1], module.history, device=device)
                c_out, c_in, kernel = module.weight.shape
                needs.append(ops.conv1d_stream_workspace_size(batch_size, c_in, c_out, kernel, module.stride,
                                                              lengths[name]))
            elif isinstance(module, CausalConvTranspose1d):
                self.overlap[name] = torch.zeros(2, batch_size, module.out_channels, module.overlap, device=device)
                needs.append(ops.conv_transpose1d_stream_workspace_size(
                    batch_size, module.weight.shape[0], module.out_channels, module.weight.shape[-1], module.stride,
                    lengths[name], module.groups))
        self.workspace = ops.SplitWorkspace(max(n[0] for n in needs), max(n[1] for n in needs), device)
        ring = (batch_size, config.num_heads, config.context, config.head_dim)
        self.rings = {f"{side}.{i}": (torch.zeros(ring, device=device), torch.zeros(ring, device=device))
                      for side in ("encoder_transformer", "decoder_transformer") for i in range(config.num_layers)}

    def reset(self, slots: torch.Tensor) -> None:
        """Restarts the selected slots (bool mask [B]) in both directions."""
        self.encoder_frame[slots] = 0
        self.decoder_frame[slots] = 0
        for tensor in (*self.history.values(), *self.overlap.values()):
            tensor[:, slots] = 0
