"""The reference against Kyutai's `moshi` package: same random weights through Kyutai's file format."""
import torch
from safetensors.torch import save_file

from moshi_fast import FastMoshi, MimiCodec
from moshi_fast.reference.lm import LM
from moshi_fast.weights import MoshiCheckpoint, find_moshi_checkpoint, load_lm

from .helpers import rel_err, speech_like

BATCH = 2


def _near_tie_margins(codec: MimiCodec, pcm: torch.Tensor) -> torch.Tensor:
    """Relative gap (d2 - d1) / d1 between the two nearest codewords at every RVQ level [B, K, F]."""
    state = codec.model.init_encoder_state(pcm.shape[0])
    run = torch.ones(pcm.shape[0], dtype=torch.bool)
    latents = torch.cat([codec.model.encode_latent_step(chunk, state, run)
                         for chunk in pcm.split(codec.frame_size, dim=-1)], dim=-1)
    margins = []
    for rvq in (codec.model.quantizer.semantic, codec.model.quantizer.acoustic):
        residual = torch.nn.functional.conv1d(latents, rvq.input_proj).transpose(1, 2)
        for codebook in rvq.codebooks:
            distances = torch.cdist(residual, codebook[None].expand(residual.shape[0], -1, -1))
            nearest = distances.topk(2, largest=False).values
            margins.append((nearest[..., 1] - nearest[..., 0]) / nearest[..., 0])
            residual = residual - codebook[distances.argmin(-1)]
    return torch.stack(margins, dim=1)


def test_mimi_streaming_matches_kyutai(kyutai_mimi):
    model, path = kyutai_mimi
    codec = MimiCodec.from_pretrained(path, device="cpu")
    frames = 25
    pcm = speech_like(BATCH, frames)
    chunks = pcm.split(codec.frame_size, dim=-1)
    with torch.no_grad(), model.streaming(BATCH):
        theirs = torch.cat([model.encode(chunk) for chunk in chunks], dim=-1)
        their_pcm = torch.cat([model.decode(theirs[..., t:t + 1]) for t in range(frames)], dim=-1)
    stream = codec.stream(BATCH)
    ours = torch.cat([stream.encode(chunk) for chunk in chunks], dim=-1)
    our_pcm = torch.cat([stream.decode(theirs[..., t:t + 1]) for t in range(frames)], dim=-1)

    assert ours.shape == theirs.shape == (BATCH, 8, frames)
    distinct_per_level = [len(torch.unique(theirs[:, level])) for level in range(theirs.shape[1])]
    assert min(distinct_per_level) > 1 and sum(distinct_per_level) > 40, f"codes barely vary: {distinct_per_level}"
    agreement = float((ours == theirs).float().mean())
    margins = _near_tie_margins(codec, pcm)
    mismatch_margins = margins[ours != theirs]
    print(f"\nMimi vs Kyutai: codes equal {agreement:.4%} of {ours.numel()} (distinct per level "
          f"{distinct_per_level}), smallest codeword margin "
          f"{float(margins.min()):.2e}, margins at mismatches {mismatch_margins.tolist()}")
    assert agreement >= 0.999
    error = rel_err(our_pcm, their_pcm)
    print(f"Mimi vs Kyutai: decode relative error {error:.2e}")
    assert error <= 1e-5


def test_mimi_whole_signal_equals_streaming(kyutai_mimi):
    _, path = kyutai_mimi
    codec = MimiCodec.from_pretrained(path, device="cpu")
    pcm = speech_like(BATCH, 6, seed=3)[..., :-700]
    codes = codec.encode(pcm)
    assert codes.shape == (BATCH, 8, 6)
    padded = torch.nn.functional.pad(pcm, (0, 700))
    stream = codec.stream(BATCH)
    streamed = torch.cat([stream.encode(c) for c in padded.split(1920, dim=-1)], dim=-1)
    assert torch.equal(codes, streamed)
    decoded = codec.decode(codes)
    stream.reset()
    assert torch.equal(decoded, torch.cat([stream.decode(codes[..., t:t + 1]) for t in range(6)], dim=-1))


def test_mimi_loads_live_model_names(kyutai_mimi, tmp_path):
    model, path = kyutai_mimi
    live = tmp_path / "live.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(live))
    assert any(".in_projs.0.weight" in k for k in model.state_dict())
    from_file = MimiCodec.from_pretrained(path, device="cpu").model.state_dict()
    from_live = MimiCodec.from_pretrained(live, device="cpu").model.state_dict()
    assert from_file.keys() == from_live.keys()
    for name in from_file:
        assert torch.equal(from_file[name], from_live[name]), name


def _kyutai_delayed(model, codes):
    from moshi.models.lm_utils import _delay_sequence

    initial = model._get_initial_token().expand(codes.shape[0], -1, -1)
    return torch.cat([initial, _delay_sequence(model.delays, codes, initial)], dim=2)


def test_lm_teacher_forced_logits_match_kyutai(kyutai_moshi):
    model, directory = kyutai_moshi
    checkpoint = find_moshi_checkpoint(directory)
    lm = load_lm(checkpoint, lambda: LM(checkpoint.config.lm), torch.float32, "cpu")
    config = checkpoint.config.lm
    steps = 40
    codes = torch.randint(0, config.card, (BATCH, config.num_streams, steps))
    codes[:, 0] = torch.randint(0, config.text_card, (BATCH, steps))
    delayed = _kyutai_delayed(model, codes)
    with torch.no_grad():
        their_h, their_text = model.forward_text(delayed[:, :, :-1])
        their_audio = model.forward_depformer_training(delayed[:, :, 1:], their_h)
        our_h, our_text = lm.forward_text(delayed[:, :, :-1])
        our_audio = lm.depformer_logits(our_h, delayed[:, :config.dep_q, 1:].transpose(1, 2))
    text_error = rel_err(our_text, their_text[:, 0])
    audio_error = rel_err(our_audio.transpose(1, 2), their_audio)
    print(f"\nLM vs Kyutai, teacher forced: text logits rel err {text_error:.2e}, audio {audio_error:.2e}")
    assert text_error <= 1e-5 and audio_error <= 1e-5


def test_lm_loads_live_model_names(kyutai_moshi, tmp_path):
    model, directory = kyutai_moshi
    checkpoint = find_moshi_checkpoint(directory)
    live = tmp_path / "live"
    live.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(".in_projs.3.weight" in k for k in state)
    save_file(state, str(live / "model.safetensors"))
    live_checkpoint = MoshiCheckpoint("kyutai", checkpoint.config, live / "model.safetensors", checkpoint.mimi_file, None)
    from_file = load_lm(checkpoint, lambda: LM(checkpoint.config.lm), torch.float32, "cpu").state_dict()
    from_live = load_lm(live_checkpoint, lambda: LM(checkpoint.config.lm), torch.float32, "cpu").state_dict()
    for name in from_file:
        assert torch.equal(from_file[name], from_live[name]), name


def test_greedy_engine_matches_kyutai_loop(kyutai_mimi, kyutai_moshi):
    from moshi.models import LMGen

    mimi, _ = kyutai_mimi
    lm, directory = kyutai_moshi
    frames = 50
    pcm = speech_like(BATCH, frames, seed=7)[:, 0]
    engine = FastMoshi.from_pretrained(directory, device="cpu", max_batch=BATCH, use_sampling=False)
    generator = LMGen(lm, use_sampling=False)
    their_tokens, their_pcm, our_tokens, our_pcm = [], [], [], []
    with torch.no_grad(), mimi.streaming(BATCH), generator.streaming(BATCH):
        for t in range(frames):
            frame = pcm[:, t * 1920:(t + 1) * 1920]
            tokens = generator.step(mimi.encode(frame[:, None]))
            if tokens is None:
                their_tokens.append(torch.full((BATCH, 9), -1))
                their_pcm.append(torch.zeros(BATCH, 1920))
            else:
                their_tokens.append(tokens[:, :, 0])
                their_pcm.append(mimi.decode(tokens[:, 1:])[:, 0])
            out = engine.step(frame)
            our_tokens.append(torch.cat([out.text_tokens[:, None], out.audio_codes], dim=1))
            our_pcm.append(out.pcm)
    their_tokens, our_tokens = torch.stack(their_tokens), torch.stack(our_tokens)
    assert torch.equal(our_tokens[0], torch.full((BATCH, 9), -1))
    assert len(torch.unique(their_tokens[1:, :, 0])) > 5, "random LM should emit varied text"
    assert torch.equal(our_tokens, their_tokens)
    error = rel_err(torch.stack(our_pcm), torch.stack(their_pcm))
    print(f"\nFastMoshi vs Kyutai LMGen+Mimi, greedy, {frames} frames x {BATCH}: tokens equal, pcm rel err {error:.2e}")
    assert error <= 1e-5


def test_kyutai_directory_config_is_honoured(kyutai_moshi):
    _, directory = kyutai_moshi
    engine = FastMoshi.from_pretrained(directory, device="cpu")
    assert engine.tokenizer is not None and engine.tokenizer.vocab_size == engine.config.lm.text_card
    assert engine.sampling["temp"] == 0.6 and engine.sampling["top_k"] == 100
    assert engine.sampling["temp_text"] == 0.7 and engine.sampling["top_k_text"] == 25
