"""A worker process that does the Ogg/Opus coding of some of the server's conversations.

sphn holds the GIL while it codes, about 1-2.5 ms per 80 ms frame and conversation to encode and 0.3 ms
to decode: 64 conversations in the server's own process would need a whole CPU core, under the lock the
event loop and the engine's thread need too. The server (`server.OpusWorkers`) starts this file as a
script, by path, so that it imports numpy and sphn only (not the package, not torch), and talks to it
over its stdin and stdout.

Protocol: each message either way is an 8-byte little-endian length, then that many bytes of pickle.
Once it has imported sphn the worker says "ready". Requests:

    ("encode", [(conversation id, pcm float32 [n]), ...])  ->  [(conversation id, Ogg/Opus bytes), ...]
        in the same order, each conversation's outgoing stream continuing from its last frame
    ("decode", (conversation id, Ogg/Opus bytes))  ->  ("pcm", float32 [m]) (m may be 0: pages carry
        20 ms), or ("error", reason) for bytes that are not Ogg/Opus, from its incoming stream
    ("close", conversation id)  ->  no answer; forgets both of that conversation's streams

The worker exits when its stdin closes.

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
    writers, readers = {}, {}
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
        elif kind == "decode":
            conversation, data = payload
            reader = readers.get(conversation)
            if reader is None:
                reader = readers[conversation] = sphn.OpusStreamReader(sample_rate)
            try:
                write_message(replies, ("pcm", reader.append_bytes(data)))
            except ValueError as e:
                write_message(replies, ("error", str(e)))
        elif kind == "close":
            writers.pop(payload, None)
            readers.pop(payload, None)
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
