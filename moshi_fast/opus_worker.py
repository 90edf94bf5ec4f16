"""A worker process that Ogg/Opus-encodes the outgoing audio of some of the server's conversations.

sphn holds the GIL while it encodes, about 1-2.5 ms per 80 ms frame and conversation: 64 conversations
in the server's own process would need a whole CPU core, under the lock the event loop and the engine's
thread need too. The server (`server.OpusWorkers`) starts this file as a script, by path, so that it
imports numpy and sphn only (not the package, not torch), and talks to it over its stdin and stdout.

Protocol: each message either way is an 8-byte little-endian length, then that many bytes of pickle.
Once it has imported sphn the worker says "ready". Requests are ("encode", [(conversation id, pcm float32 [n]), ...]), answered with [(conversation id,
Ogg/Opus bytes), ...] in the same order, each conversation's stream continuing from its last frame; and
("close", conversation id), unanswered, which forgets that conversation's stream. The worker exits when
its stdin closes.

    python opus_worker.py SAMPLE_RATE
"""
import os
import pickle
import struct
import sys

HEADER = struct.Struct("<Q")


def read_message(stream):
    """The next message from a binary stream, or None at its end."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    size = HEADER.unpack(header)[0]
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)


def write_message(stream, message) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(payload)) + payload)
    stream.flush()


def serve(sample_rate: int, requests, replies) -> None:
    import sphn

    write_message(replies, "ready")
    writers = {}
    while (message := read_message(requests)) is not None:
        kind, payload = message
        if kind == "encode":
            encoded = []
            for conversation, pcm in payload:
                writer = writers.get(conversation)
                if writer is None:
                    writer = writers[conversation] = sphn.OpusStreamWriter(sample_rate)
                encoded.append((conversation, writer.append_pcm(pcm)))
            write_message(replies, encoded)
        elif kind == "close":
            writers.pop(payload, None)
        else:
            raise ValueError(f"unknown request {kind!r}")


if __name__ == "__main__":
    # Run by path, Python puts this file's folder first on sys.path, where the package's own modules
    # (config, audio, ...) would shadow any installed module of the same name.
    sys.path.pop(0)
    # Replies get a private copy of stdout; anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(int(sys.argv[1]), sys.stdin.buffer, replies)
