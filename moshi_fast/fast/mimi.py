"""The fast Mimi: the reference codec's parameters (same names, same loader), run with ops only.

Per frame and direction about 50 launches at B slots (Mimi's real config): the SEANet convs as
streaming Triton convs with their ELU and residual add fused and their history carried in place
(transposed convs on weights packed once for coalesced loads), the transformer as four
weight-streaming linears per layer (LayerNorm fused into the qkv and fc1 prologues, GELU into fc1's
epilogue, the layer scales folded into the output and fc2 weights whose residual add updates the
stream in place) and one ring-attention kernel (RoPE and the KV write fused), and the split RVQ in
one launch each way. Kernels that split long reductions share the cache's `SplitWorkspace`.
`encode_step` / `decode_step` take a `MimiCache` and an execution mask; they allocate only what a
CUDA graph captures once, and never sync.
"""
from __future__ import annotations

import torch

from .. import ops
from ..cache import MimiCache
from ..graphs import CapturedStep
from ..reference.mimi import CausalConvTranspose1d, Mimi, SEANetDecoder, SEANetEncoder, Transformer


class FastMimi(Mimi):
    """Call `prepare()` once after the weights are loaded (derived tensors: stacked quantizer
    weights, codeword norms, layer-scale-folded projections)."""

    @torch.no_grad()
    def prepare(self) -> "FastMimi":
        q = self.quantizer
        derived = {
            "input_proj": torch.stack([q.semantic.input_proj[..., 0], q.acoustic.input_proj[..., 0]]),
            "output_proj": torch.stack([q.semantic.output_proj[..., 0], q.acoustic.output_proj[..., 0]]),
            "codebooks": torch.cat([q.semantic.codebooks, q.acoustic.codebooks]),
        }
        derived["codebook_norms"] = (derived["codebooks"].double() ** 2).sum(-1).float()
        for name, value in derived.items():
            self.register_buffer(name, value.contiguous(), persistent=False)
        self.n_semantic = q.semantic.codebooks.shape[0]
        # The dense convs' derived weights: the transposed convs' packed layout, and the tf32 parts of those whose
        # measured plans read the weight that way (split_weight).
        lengths = self.streaming_input_lengths()
        for name, module in self.named_modules():
            if name not in lengths or getattr(module, "groups", 1) != 1:
                continue
            if isinstance(module, CausalConvTranspose1d):
                module.register_buffer("packed_weight", ops.pack_conv_transpose_weight(module.weight, module.stride),
                                       persistent=False)
                if ops.tuned_split_weight("convtr", *module.weight.shape, module.stride, lengths[name], 1):
                    module.register_buffer("weight_parts", ops.split_tf32(module.packed_weight), persistent=False)
            elif ops.tuned_split_weight("conv1d", module.weight.shape[1], module.weight.shape[0],
                                        module.weight.shape[2], module.stride, lengths[name]):
                module.register_buffer("weight_parts", ops.split_tf32(module.weight), persistent=False)
        for side in (self.encoder_transformer, self.decoder_transformer):
            for layer in side.layers:
                # x + s * (W a) == x + (s W) a: the layer scale folds into the projection, and the
                # residual add becomes the GEMM's accumulate.
                layer.register_buffer("out_scaled", (layer.out.weight * layer.scale1[:, None]).contiguous(),
                                      persistent=False)
                layer.register_buffer("fc2_scaled", (layer.fc2.weight * layer.scale2[:, None]).contiguous(),
                                      persistent=False)
        ops.settle_weights(self)
        return self

    def streaming_input_lengths(self) -> dict[str, int]:
        """Input steps per frame of every streaming conv and transposed conv, by module name (the
        shapes the kernels are planned for, e.g. to size the split-K workspace once)."""
        c = self.config
        lengths = {"encoder.conv_in": c.frame_size}
        steps = c.frame_size
        for i, ratio in enumerate(reversed(c.ratios)):
            for conv in ("res.conv1", "res.conv2", "down"):
                lengths[f"encoder.stages.{i}.{conv}"] = steps
            steps //= ratio
        lengths["encoder.conv_out"] = steps
        lengths["downsample"] = steps
        lengths["upsample"] = steps // self.downsample.stride
        lengths["decoder.conv_in"] = steps
        for i, ratio in enumerate(c.ratios):
            lengths[f"decoder.stages.{i}.up"] = steps
            steps *= ratio
            lengths[f"decoder.stages.{i}.res.conv1"] = steps
            lengths[f"decoder.stages.{i}.res.conv2"] = steps
        lengths["decoder.conv_out"] = steps
        return lengths

    def _seanet_encoder(self, x, cache: MimiCache, frame):
        e: SEANetEncoder = self.encoder
        x = _conv(e.conv_in, "encoder.conv_in", x, cache, frame)
        for i, stage in enumerate(e.stages):
            y = _conv(stage.res.conv1, f"encoder.stages.{i}.res.conv1", x, cache, frame, elu=True)
            x = _conv(stage.res.conv2, f"encoder.stages.{i}.res.conv2", y, cache, frame, elu=True, residual=x)
            x = _conv(stage.down, f"encoder.stages.{i}.down", x, cache, frame, elu=True)
        steps = x.shape[-1]
        # conv_out writes time-major [B, T, C], the transformer's layout, through its output strides.
        out = torch.empty(x.shape[0], steps, e.conv_out.weight.shape[0], device=x.device).transpose(1, 2)
        return _conv(e.conv_out, "encoder.conv_out", x, cache, frame, elu=True, out=out).transpose(1, 2)

    def _seanet_decoder(self, x, cache: MimiCache, frame):
        d: SEANetDecoder = self.decoder
        x = _conv(d.conv_in, "decoder.conv_in", x, cache, frame)
        for i, stage in enumerate(d.stages):
            up = _conv_transpose(stage.up, f"decoder.stages.{i}.up", x, cache, frame, elu=True)
            y = _conv(stage.res.conv1, f"decoder.stages.{i}.res.conv1", up, cache, frame, elu=True)
            x = _conv(stage.res.conv2, f"decoder.stages.{i}.res.conv2", y, cache, frame, elu=True, residual=up)
        return _conv(d.conv_out, "decoder.conv_out", x, cache, frame, elu=True)

    def _transformer(self, transformer: Transformer, name: str, x, cache: MimiCache, frame):
        """x [B, T, C] contiguous, updated in place; T new steps at positions frame * T + t."""
        c = self.config
        batch, steps, width = x.shape
        rows = x.view(batch * steps, width)
        for i, layer in enumerate(transformer.layers):
            qkv = ops.linear(rows, layer.qkv.weight, norm=(layer.norm1.weight, layer.norm1.bias, c.norm_eps),
                             workspace=cache.workspace)
            ring_k, ring_v = cache.rings[f"{name}.{i}"]
            attended = ops.ring_attention(qkv.view(batch, steps, -1), ring_k, ring_v, frame, c.max_period,
                                          workspace=cache.workspace)
            ops.linear(attended.view(batch * steps, width), layer.out_scaled, residual=rows, out=rows,
                       workspace=cache.workspace)
            hidden = ops.linear(rows, layer.fc1.weight, norm=(layer.norm2.weight, layer.norm2.bias, c.norm_eps),
                                activation="gelu", workspace=cache.workspace)
            ops.linear(hidden, layer.fc2_scaled, residual=rows, out=rows, workspace=cache.workspace)
        return x

    def encode_step(self, pcm: torch.Tensor, cache: MimiCache, exec_mask: torch.Tensor,
                    scratch: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, frame_size] float32 -> codes [B, num_codebooks] int64. Slots whose exec_mask is
        False keep their state (their counter does not advance; their codes are meaningless)."""
        frame = cache.encoder_frame
        x = self._seanet_encoder(pcm, cache, frame)
        x = self._transformer(self.encoder_transformer, "encoder_transformer", x, cache, frame)
        latent = ops.conv1d_stream(x.transpose(1, 2), cache.history["downsample"], frame, self.downsample.weight,
                                   None, self.downsample.stride, replicate=True,
                                   weight_parts=getattr(self.downsample, "weight_parts", None))
        codes = ops.rvq_encode(latent[..., 0], self.input_proj, self.codebooks, self.codebook_norms,
                               self.n_semantic, scratch)
        frame.add_(exec_mask)
        return codes

    def decode_step(self, codes: torch.Tensor, cache: MimiCache, exec_mask: torch.Tensor) -> torch.Tensor:
        """codes [B, num_codebooks] int64 -> pcm [B, 1, frame_size] float32 (same exec_mask contract)."""
        frame = cache.decoder_frame
        latent = ops.rvq_decode(codes, self.codebooks, self.output_proj, self.n_semantic)
        # The upsample writes time-major [B, T, C], the transformer's layout, through its output strides.
        steps = self.upsample.stride
        up = torch.empty(latent.shape[0], steps, latent.shape[1], device=latent.device).transpose(1, 2)
        x = _conv_transpose(self.upsample, "upsample", latent[..., None], cache, frame, out=up)
        x = self._transformer(self.decoder_transformer, "decoder_transformer", x.transpose(1, 2), cache, frame)
        pcm = self._seanet_decoder(x.transpose(1, 2), cache, frame)
        frame.add_(exec_mask)
        return pcm


def _conv(conv, name, x, cache: MimiCache, frame, elu=False, residual=None, out=None):
    return ops.conv1d_stream(x, cache.history[name], frame, conv.weight, conv.bias, conv.stride, elu, residual,
                             out=out, workspace=cache.workspace, weight_parts=getattr(conv, "weight_parts", None))


def _conv_transpose(conv, name, x, cache: MimiCache, frame, elu=False, out=None):
    return ops.conv_transpose1d_stream(x, cache.overlap[name], frame, conv.weight, conv.bias, conv.stride,
                                       conv.groups, elu, out=out, packed_weight=getattr(conv, "packed_weight", None),
                                       workspace=cache.workspace, weight_parts=getattr(conv, "weight_parts", None))


class FastMimiRunner:
    """Streams a batch through the fast codec: one captured CUDA graph per direction (on CUDA,
    unless eager) with static inputs, the execution mask [B] among them (slots outside it keep their state)."""

    def __init__(self, model: FastMimi, batch_size: int, device: torch.device, eager: bool = False):
        c = model.config
        self.cache = MimiCache(model, batch_size, device)
        self.scratch = ops.rvq_encode_scratch(batch_size, c.num_codebooks, c.codebook_dim, device)
        mask = torch.ones(batch_size, dtype=torch.bool, device=device)
        pcm = torch.zeros(batch_size, 1, c.frame_size, device=device)
        codes = torch.zeros(batch_size, c.num_codebooks, dtype=torch.long, device=device)
        self._encode = CapturedStep(lambda x, m: model.encode_step(x, self.cache, m, self.scratch), [pcm, mask],
                                    eager=eager)
        self._decode = CapturedStep(lambda k, m: model.decode_step(k, self.cache, m), [codes, mask], eager=eager)
        self.reset(mask)

    def encode(self, frame: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        """frame [B, 1, frame_size] -> codes [B, num_codebooks, 1] (a copy: the graph's output is reused)."""
        return self._encode(frame, exec_mask).clone()[..., None]

    def decode(self, codes: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        """codes [B, num_codebooks, 1] -> pcm [B, 1, frame_size] (a copy)."""
        return self._decode(codes[..., 0], exec_mask).clone()

    def reset(self, slots: torch.Tensor) -> None:
        self.cache.reset(slots)

    def swap(self, a: int, b: int) -> None:
        self.cache.swap(a, b)
