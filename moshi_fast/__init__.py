"""moshi_fast: a fast inference engine for Kyutai's Moshi (full-duplex speech to speech) and its Mimi codec.

    from moshi_fast import FastMoshi
    moshi = FastMoshi.from_pretrained("path/to/moshiko")      # Kyutai or transformers checkpoint
    out = moshi.step(frame)                                   # 1920 float32 samples at 24 kHz, every 80 ms
    out.pcm, out.text                                         # Moshi's 80 ms of audio and its text piece
"""
from .config import LMConfig, MimiConfig, MoshiConfig, moshiko, tiny
from .engine import FastMoshi, MimiCodec, MimiStream, SlotsBusyError, StepOutput
from .tokenizer import TextTokenizer
from .weights import CheckpointError

__all__ = ["CheckpointError", "FastMoshi", "LMConfig", "MimiCodec", "MimiConfig", "MimiStream", "MoshiConfig",
           "SlotsBusyError", "StepOutput", "TextTokenizer", "moshiko", "tiny"]
__version__ = "0.1.0"
