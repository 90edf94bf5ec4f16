"""The reference against transformers' MimiModel and MoshiForConditionalGeneration checkpoints
(rotate-half q/k rows, stacked depth-decoder weights, EMA codebooks)."""
import torch

from moshi_fast import FastMoshi, MimiCodec
from moshi_fast.reference.lm import LM, SamplingParams, StreamingLM
from moshi_fast.weights import find_moshi_checkpoint, load_lm

from .helpers import rel_err, speech_like


def test_mimi_offline_encode_decode_match_transformers(hf_mimi):
    """Whole frames: on a partial last frame transformers pads every conv on the right, while Kyutai
    (and this engine) zero-pad the signal to a whole frame, so the last frame's codes differ there."""
    model, directory = hf_mimi
    codec = MimiCodec.from_pretrained(directory, device="cpu")
    pcm = speech_like(2, 10, seed=1)
    with torch.no_grad():
        their_codes = model.encode(pcm, num_quantizers=8).audio_codes
        their_pcm = model.decode(their_codes).audio_values
    our_codes = codec.encode(pcm)
    assert our_codes.shape == their_codes.shape == (2, 8, 10)
    assert min(len(torch.unique(their_codes[:, level])) for level in range(8)) > 1
    agreement = float((our_codes == their_codes).float().mean())
    error = rel_err(codec.decode(their_codes), their_pcm)
    print(f"\nMimi vs transformers: codes equal {agreement:.4%}, decode rel err {error:.2e}")
    assert agreement >= 0.999
    assert error <= 1e-5


def _hf_lm(directory):
    checkpoint = find_moshi_checkpoint(directory)
    assert checkpoint.format == "hf"
    return load_lm(checkpoint, lambda: LM(checkpoint.config.lm), torch.float32, "cpu")


def test_moshi_teacher_forced_logits_match_transformers(hf_moshi):
    model, directory = hf_moshi
    lm = _hf_lm(directory)
    config = lm.config
    batch, steps = 2, 16
    text = torch.randint(0, config.text_card, (batch, steps))
    moshi_audio = torch.randint(0, config.card, (batch, config.dep_q, steps))
    user_audio = torch.randint(0, config.card, (batch, config.dep_q, steps))
    with torch.no_grad():
        theirs = model(input_ids=text, moshi_audio_codes=moshi_audio, user_audio_codes=user_audio)
        our_h, our_text = lm.forward_text(torch.cat([text[:, None], moshi_audio, user_audio], dim=1))
        depth_tokens = torch.cat([text[:, None], moshi_audio[:, :-1]], dim=1).transpose(1, 2)
        our_audio = lm.depformer_logits(our_h, depth_tokens)
        their_audio = torch.stack([
            model.depth_decoder(input_ids=depth_tokens[:, t], last_hidden_state=theirs.last_hidden_state[:, t:t + 1]).logits
            for t in range(steps)], dim=1)
    text_error, audio_error = rel_err(our_text, theirs.logits), rel_err(our_audio, their_audio)
    print(f"\nMoshi vs transformers, teacher forced: text logits rel err {text_error:.2e}, depth {audio_error:.2e}")
    assert text_error <= 1e-5 and audio_error <= 1e-5


def test_greedy_generation_matches_transformers_generate(hf_moshi):
    """transformers' generate() feeds the codes of one silent frame as the user stream; so do we."""
    model, directory = hf_moshi
    lm = _hf_lm(directory)
    frames = 12
    with torch.no_grad():
        theirs = model.generate(max_new_tokens=frames, do_sample=False, return_audio_codes=True)
        silence = model.audio_encoder.encode(torch.zeros(1, 1, 1920), num_quantizers=8).audio_codes[:, :, 0]
    generator = StreamingLM(lm)
    state = generator.init_state(1)
    one = lambda value, dtype: torch.full((1,), value, dtype=dtype)  # noqa: E731
    greedy = SamplingParams(one(0.0, torch.float32), one(1, torch.long), one(0.0, torch.float32),
                            one(1, torch.long), one(0, torch.long), 1, 1)
    with torch.no_grad():
        ours = torch.stack([generator.step(silence, state, torch.ones(1, dtype=torch.bool), greedy).tokens
                            for _ in range(frames)], dim=-1)
    assert torch.equal(ours[0, 0, 1:], theirs.sequences[0, 1:frames])
    assert torch.equal(ours[0, 1:, 1:], theirs.audio_codes[0, :, :frames - 1])


def test_engine_runs_from_transformers_directory(hf_moshi):
    model, directory = hf_moshi
    engine = FastMoshi.from_pretrained(directory, device="cpu", max_batch=2, use_sampling=False)
    codec = MimiCodec.from_pretrained(directory, device="cpu")
    pcm = speech_like(2, 3, seed=2)
    with torch.no_grad():
        assert torch.equal(codec.encode(pcm), model.audio_encoder.encode(pcm, num_quantizers=8).audio_codes)
    outputs = [engine.step(frame[:, 0]) for frame in pcm.split(1920, dim=-1)]
    assert outputs[0].text_tokens.tolist() == [-1, -1]
    assert all(0 <= t < engine.config.lm.text_card for o in outputs[1:] for t in o.text_tokens.tolist())
    assert outputs[2].pcm.abs().max() > 0
