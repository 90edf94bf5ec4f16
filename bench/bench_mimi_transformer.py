"""The CUDA extension's one-launch Mimi transformer (csrc/mimi_transformer_kernel.cuh) at one conversation: Mimi's 8
layers (512 wide, 8 heads of 64, FFN 2048, a ring of 250, 2 new steps), beside the default path the codec runs (per
layer a LayerNorm'd qkv product, the ring attention, the output product, a LayerNorm'd fc1 with GELU and fc2: the
Triton kernels through moshi_fast.ops, recorded as per_layer_launches_us) and the torch spec
(cuda_ext.mimi_transformer_ref: cuBLAS fp32 products, SDPA over the ring, as torch_us).

Bytes moved: the weights (12.6 MB a layer) and the rings' keys and values (1 MB a layer), read once; the floor is
that at the copy bandwidth. The weights (100.7 MB) exceed an H100's or H200's L2, so back-to-back calls read them
from DRAM, as in the frame, where the LM streams gigabytes between two codec calls. On a machine without the
extension, or whose GPU cannot hold the kernel's 16-block cluster (any CPU machine), the case skips."""
import pytest
import torch

from moshi_fast import MimiCodec, cuda_ext, moshiko, ops
from moshi_fast.cache import MimiCache
from moshi_fast.fast.mimi import FastMimi

from ._harness import graph_time

pytestmark = pytest.mark.skipif(not (cuda_ext.available()
                                     and cuda_ext._mimi_transformer_clusters(torch.device("cuda")) > 0),
                                reason="the CUDA extension or a GPU that holds its 16-block cluster is unavailable")


def test_mimi_transformer(measure, device):
    config = moshiko().mimi
    reference = MimiCodec.random(config, device="cuda", seed=1)
    model = FastMimi(config).cuda()
    model.load_state_dict(reference.model.state_dict())
    model.requires_grad_(False).prepare()
    cache = MimiCache(model, 1, device)
    cache.encoder_frame.fill_(1000)
    x = torch.randn(1, 2, config.dimension, device=device)
    layers = model.layer_params(model.encoder_transformer)
    rings = [cache.rings[f"encoder_transformer.{i}"] for i in range(config.num_layers)]
    for ring_k, ring_v in rings:
        ring_k.normal_()
        ring_v.normal_()
    frame = cache.encoder_frame

    def fast():
        ops.mimi_transformer(x, frame, layers, rings, config.max_period, config.norm_eps)

    def per_layer_launches():
        model._transformer(model.encoder_transformer, "encoder_transformer", x, cache, frame)

    def torch_path():
        cuda_ext.mimi_transformer_ref(x, frame, layers, rings, config.max_period, config.norm_eps)

    weight_bytes = sum(t.numel() * t.element_size() for params in layers for t in params)
    ring_bytes = sum(t.numel() * t.element_size() for ring in rings for t in ring)
    assert not ops.uses_mimi_cluster_transformer(x, frame, layers, rings)  # per_layer_launches times the default
    extra = measure(fast, weight_bytes + ring_bytes, torch_path, op="mimi_transformer", batch=1,
                    layers=config.num_layers, context=config.context,
                    clusters=cuda_ext._mimi_transformer_clusters(device))
    extra["per_layer_launches_us"] = graph_time(per_layer_launches) * 1e6
    extra["speedup_vs_per_layer_launches"] = extra["per_layer_launches_us"] / extra["us"]
    measure.benchmark.extra_info.update(extra)
