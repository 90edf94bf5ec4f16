"""The websocket server, driven by clients that speak Kyutai's protocol exactly as Kyutai's `moshi.client`
does (aiohttp websocket at /api/chat, one Ogg/Opus page per 1920-sample frame through sphn)."""
from __future__ import annotations

import asyncio
import json
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

# Both are dependencies of the package; a machine that installed it without them (--no-deps) skips
# this module instead of failing to collect it.
aiohttp = pytest.importorskip("aiohttp")
sphn = pytest.importorskip("sphn")

from moshi_fast import FastMoshi, TextTokenizer, audio, loadtest, tiny  # noqa: E402
from moshi_fast.server import MoshiServer, Outbox, PcmBuffer  # noqa: E402

FRAME = 1920
RATE = 24000
FRAME_S = FRAME / RATE
REPO = Path(__file__).resolve().parents[1]


def run(coroutine, timeout: float = 60):
    """Runs an async test body with a hard time limit."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def opus_pages(pcm: np.ndarray) -> list[bytes]:
    """pcm [T] as one Ogg/Opus stream, one page per 1920-sample frame, as Kyutai's client sends it."""
    writer = sphn.OpusStreamWriter(RATE)
    return [writer.append_pcm(frame) for frame in audio.frames(pcm, FRAME)]


class KyutaiClient:
    """Kyutai's client protocol: expects the 0x00 handshake, sends 0x01 + Ogg/Opus, decodes 0x01 audio with
    sphn, collects 0x02 text pieces and 0x05 errors, and records when each audio frame arrived."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url = session, url
        self.first_message: bytes | None = None
        self.reader = sphn.OpusStreamReader(RATE)
        self.pcm: list[np.ndarray] = []
        self.audio_times: list[float] = []
        self.texts: list[str] = []
        self.errors: list[str] = []
        self.unknown_kinds: list[int] = []
        self.close_code: int | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._receiver: asyncio.Task | None = None

    async def connect(self) -> bytes:
        self.ws = await self.session.ws_connect(self.url)
        message = await asyncio.wait_for(self.ws.receive(), 30)
        self.first_message = message.data if message.type == aiohttp.WSMsgType.BINARY else b""
        if self.first_message != b"\x00":
            self._record(self.first_message)
        self._receiver = asyncio.create_task(self._receive())
        return self.first_message

    def _record(self, data: bytes) -> None:
        if data[:1] == b"\x01":
            pcm = self.reader.append_bytes(data[1:])
            if pcm.size:
                self.pcm.append(pcm)
                self.audio_times.append(time.perf_counter())
        elif data[:1] == b"\x02":
            self.texts.append(data[1:].decode("utf-8"))
        elif data[:1] == b"\x05":
            self.errors.append(data[1:].decode("utf-8"))
        else:
            self.unknown_kinds.append(data[0] if data else -1)

    async def _receive(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                self._record(message.data)
        self.close_code = self.ws.close_code

    @property
    def frames_received(self) -> int:
        return sum(p.size for p in self.pcm) // FRAME

    def received_pcm(self) -> np.ndarray:
        return np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.float32)

    async def stream(self, pages: list[bytes], start: float | None = None) -> None:
        """Sends one page per 80 ms, on a fixed schedule from `start`, as a microphone would."""
        start = time.perf_counter() if start is None else start
        for index, page in enumerate(pages):
            await asyncio.sleep(max(0.0, start + index * FRAME_S - time.perf_counter()))
            await self.ws.send_bytes(b"\x01" + page)

    async def wait_for_frames(self, count: int, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while self.frames_received < count and time.perf_counter() < deadline and not self._receiver.done():
            await asyncio.sleep(0.02)

    async def wait_closed(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.shield(self._receiver), timeout)

    async def close(self) -> None:
        await self.ws.close()
        await self.wait_closed(10)

    async def abort(self, reset: bool) -> None:
        """Drops the connection without a websocket close: a FIN (a vanished peer) or, with reset, an RST
        (a killed process: closing a socket whose linger time is 0 resets it)."""
        sock = self.ws.get_extra_info("socket")
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await self.session.close()
        else:
            sock.shutdown(socket.SHUT_RDWR)


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def test_pcm_buffer_keeps_the_newest_samples():
    buffer = PcmBuffer(max_samples=5)
    buffer.push(np.arange(3, dtype=np.float32))
    buffer.push(np.arange(3, 7, dtype=np.float32))
    assert len(buffer) == 5 and buffer.dropped == 2
    np.testing.assert_array_equal(buffer.pop(2), [2, 3])
    np.testing.assert_array_equal(buffer.pop(3), [4, 5, 6])
    with pytest.raises(ValueError):
        buffer.pop(1)


def test_outbox_drops_the_oldest_audio_but_never_the_stream_header():
    async def body():
        outbox = Outbox(capacity=3)
        outbox.put(b"\x01header", droppable=False)
        outbox.put(b"\x01a")
        outbox.put(b"\x02text")
        outbox.put(b"\x01b")
        outbox.put(b"\x01c")
        assert outbox.dropped == 2
        return [await outbox.get() for _ in range(len(outbox))]

    assert run(body()) == [b"\x01header", b"\x02text", b"\x01c"]


@pytest.fixture
def tokenizer(tokenizer_file):
    return TextTokenizer(tokenizer_file, (tiny().lm.text_end_padding_id, tiny().lm.text_padding_id))


def _engine(max_batch: int, tokenizer=None) -> FastMoshi:
    return FastMoshi.random(tiny(), device="cpu", max_batch=max_batch, seed=7, tokenizer=tokenizer)


@pytest.mark.parametrize("opus_processes", [1, 0], ids=["worker-process", "in-process"])
def test_handshake_audio_round_trip_and_text_match_the_engine(tokenizer, opus_processes):
    pages = opus_pages(audio.test_signal(1.2, RATE, seed=3))
    # What the server hears is the Opus-decoded signal: a twin engine stepped on it gives the
    # expected audio and text.
    heard = sphn.OpusStreamReader(RATE)
    frames = np.concatenate([heard.append_bytes(page) for page in pages]).reshape(-1, FRAME)
    twin = _engine(2, tokenizer)
    slot = twin.open()
    expected = [twin.step({slot: frame}) for frame in frames]
    expected_pcm = np.concatenate([out.pcm[0].numpy() for out in expected])
    expected_text = [out.text[0] for out in expected if out.text[0]]
    assert expected_text, "the twin engine produced no text: pick another seed"

    async def body():
        async with MoshiServer(_engine(2, tokenizer), opus_processes=opus_processes) as server:
            port = await server.start("127.0.0.1", 0)
            async with aiohttp.ClientSession() as session:
                client = KyutaiClient(session, f"ws://127.0.0.1:{port}/api/chat")
                assert await client.connect() == b"\x00"
                await client.stream(pages)
                await client.wait_for_frames(len(pages), timeout=10)
                await client.close()
                await wait_until(lambda: server.engine.open_slots == [], 10, "the slot to be freed")
            return client

    client = run(body())
    assert client.frames_received == len(pages)
    assert client.errors == [] and client.unknown_kinds == []
    assert client.texts == expected_text
    received = client.received_pcm()
    assert received.size == expected_pcm.size
    assert np.abs(received[:FRAME]).max() < 1e-3, "a conversation's first frame is silence"
    # Opus is lossy and delays the signal by its look-ahead: after aligning, the loudness of every
    # 20 ms of the reply follows Moshi's audio.
    end = expected_pcm.size - 2 * FRAME
    lag = max(range(400), key=lambda k: np.dot(expected_pcm[FRAME:end], received[FRAME + k:end + k]))

    def envelope(x):
        return np.sqrt((x.reshape(-1, 480) ** 2).mean(axis=1))

    aligned = received[FRAME + lag:end + lag]
    assert np.corrcoef(envelope(expected_pcm[FRAME:end]), envelope(aligned))[0, 1] > 0.9
    assert np.std(received) == pytest.approx(np.std(expected_pcm), rel=0.3)


def test_opus_workers_encode_exactly_like_the_library_in_process():
    """Two conversations' streams interleaved over two worker processes: every page is the bytes sphn
    writes in this process, a forgotten conversation starts a new stream, and a worker killed
    mid-conversation fails the streams it held while new conversations encode on its replacement;
    decoding gives what sphn decodes here, and bytes that are not Ogg/Opus raise ValueError."""
    from moshi_fast.server import OpusWorkerDied, OpusWorkers

    assert MoshiServer(_engine(2)).opus_processes == 0, "a CPU engine keeps the coding in its process"
    signals = {cid: audio.test_signal(0.8, RATE, seed=cid) for cid in (1, 2, 3)}
    frames = {cid: audio.frames(signal, FRAME) for cid, signal in signals.items()}
    workers = OpusWorkers(2, RATE)
    try:
        assert [workers.worker_of(cid) for cid in (1, 2, 3)] == [1, 0, 1]
        got = {cid: [] for cid in frames}
        for t in range(len(frames[1])):
            for cid in (1, 3):
                got[cid] += workers.encode(1, [(cid, frames[cid][t])]).result(timeout=30)
            got[2] += workers.encode(0, [(2, frames[2][t])]).result(timeout=30)
        for cid, pages in got.items():
            assert pages == opus_pages(signals[cid]), cid
        workers.forget(1)
        assert workers.encode(1, [(1, frames[1][0])]).result(timeout=30) == opus_pages(signals[1])[:1]
        workers._processes[1].kill()
        with pytest.raises(OpusWorkerDied) as died:
            workers.encode(1, [(3, frames[3][0])]).result(timeout=30)
        assert died.value.conversations == {1, 3}
        with pytest.raises(OpusWorkerDied):
            workers.encode(1, [(1, frames[1][1])]).result(timeout=30)
        assert workers.encode(1, [(5, frames[1][0])]).result(timeout=30) == opus_pages(signals[1])[:1]
        reader = sphn.OpusStreamReader(RATE)
        for page in opus_pages(signals[2]):
            np.testing.assert_array_equal(workers.decode(7, page).result(timeout=30), reader.append_bytes(page))
        with pytest.raises(ValueError):
            workers.decode(8, b"not an ogg stream at all, " * 4).result(timeout=30)
    finally:
        workers.shutdown()
    assert all(process.poll() == 0 for process in workers._processes)


def test_a_dead_opus_worker_closes_its_conversations_and_the_server_goes_on(caplog):
    pages = opus_pages(audio.test_signal(1.2, RATE))

    async def body():
        async with MoshiServer(_engine(3), opus_processes=1) as server:
            port = await server.start("127.0.0.1", 0)
            url = f"ws://127.0.0.1:{port}/api/chat"
            async with aiohttp.ClientSession() as session:
                first, second = KyutaiClient(session, url), KyutaiClient(session, url)
                for client in (first, second):
                    assert await client.connect() == b"\x00"
                await asyncio.gather(first.stream(pages[:5]), second.stream(pages[:5]))
                await wait_until(lambda: first.frames_received >= 3 and second.frames_received >= 3, 10,
                                 "the first frames")
                server._opus_workers._processes[0].kill()
                # The server closes both while they stream: their sends then fail.
                streamed = await asyncio.gather(first.stream(pages[5:]), second.stream(pages[5:]),
                                                return_exceptions=True)
                assert all(r is None or isinstance(r, ConnectionError) for r in streamed), streamed
                await asyncio.gather(first.wait_closed(10), second.wait_closed(10))
                await wait_until(lambda: server.engine.open_slots == [], 10, "the slots to be freed")
                third = KyutaiClient(session, url)
                assert await third.connect() == b"\x00"
                await third.stream(pages[:6])
                await third.wait_for_frames(6, timeout=10)
                await third.close()
            return first, second, third

    with caplog.at_level("ERROR", logger="moshi_fast.server"):
        first, second, third = run(body())
    for client in (first, second):
        assert client.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR and client.errors == ["internal error"]
    assert third.frames_received == 6 and third.errors == []
    assert any("exited with code" in r.getMessage() for r in caplog.records)


def test_full_server_refuses_clearly_and_accepts_again_once_a_slot_frees():
    async def body():
        async with MoshiServer(_engine(1)) as server:
            port = await server.start("127.0.0.1", 0)
            url = f"ws://127.0.0.1:{port}/api/chat"
            async with aiohttp.ClientSession() as session:
                first, second, third = (KyutaiClient(session, url) for _ in range(3))
                assert await first.connect() == b"\x00"
                refusal = await second.connect()
                await second.wait_closed(10)
                await first.close()
                await wait_until(lambda: server.engine.open_slots == [], 10, "the slot to be freed")
                assert await third.connect() == b"\x00"
                await third.stream(opus_pages(audio.test_signal(0.3, RATE)))
                await third.wait_for_frames(3, timeout=10)
                await third.close()
                await wait_until(lambda: server.engine.open_slots == [], 10, "the slot to be freed")
            return refusal, second, third, server.stats()

    refusal, second, third, stats = run(body())
    assert refusal[:1] == b"\x05" and b"server full" in refusal
    assert second.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER
    assert third.frames_received >= 3
    assert stats["refused"] == 1 and stats["accepted"] == 2 and stats["open_slots"] == []


def test_a_client_that_stops_reading_loses_its_oldest_audio_and_stalls_nobody():
    pages = opus_pages(audio.test_signal(1.6, RATE))

    async def body():
        async with MoshiServer(_engine(2), output_backlog=4) as server:
            port = await server.start("127.0.0.1", 0)
            url = f"ws://127.0.0.1:{port}/api/chat"
            async with aiohttp.ClientSession() as session:
                stalled, steady = KyutaiClient(session, url), KyutaiClient(session, url)
                assert await stalled.connect() == b"\x00"
                assert await steady.connect() == b"\x00"
                # The stalled peer's socket no longer drains: every send to it blocks.
                (conversation,) = [c for c in server._conversations.values() if c.slot == 0]
                conversation.ws.send_bytes = lambda data: asyncio.Event().wait()
                start = time.perf_counter() + 0.2
                await asyncio.gather(stalled.stream(pages, start), steady.stream(pages, start))
                await steady.wait_for_frames(len(pages), timeout=10)
                queued = len(conversation.outbox)
                stats = server.stats()
                await stalled.close()
                await steady.close()
                await wait_until(lambda: server.engine.open_slots == [], 10, "the slots to be freed")
            return steady, queued, stats

    steady, queued, stats = run(body())
    assert steady.frames_received == len(pages)
    assert queued <= 4 and stats["dropped_messages"] >= len(pages) // 2


MALFORMED = {
    "unknown kind": lambda ws: ws.send_bytes(b"\x09hello"),
    "empty message": lambda ws: ws.send_bytes(b""),
    "text frame": lambda ws: ws.send_str("hello"),
    "invalid Opus": lambda ws: ws.send_bytes(b"\x01" + b"not an ogg stream at all, " * 4),
}


@pytest.mark.parametrize("opus_processes", [1, 0], ids=["worker-process", "in-process"])
def test_malformed_messages_close_that_connection_only(caplog, opus_processes):
    pages = opus_pages(audio.test_signal(2.0, RATE))

    async def body():
        async with MoshiServer(_engine(2), opus_processes=opus_processes) as server:
            port = await server.start("127.0.0.1", 0)
            url = f"ws://127.0.0.1:{port}/api/chat"
            async with aiohttp.ClientSession() as session:
                good = KyutaiClient(session, url)
                assert await good.connect() == b"\x00"
                streaming = asyncio.create_task(good.stream(pages))
                bad_clients = []
                for send_malformed in MALFORMED.values():
                    bad = KyutaiClient(session, url)
                    assert await bad.connect() == b"\x00"
                    await bad.stream(pages[:2])
                    await send_malformed(bad.ws)
                    await bad.wait_closed(10)
                    bad_clients.append(bad)
                await streaming
                await good.wait_for_frames(len(pages), timeout=10)
                await good.close()
                await wait_until(lambda: server.engine.open_slots == [], 10, "the slots to be freed")
            return good, bad_clients, server.stats()

    with caplog.at_level("WARNING", logger="moshi_fast.server"):
        good, bad_clients, stats = run(body())
    for (what, _), bad in zip(MALFORMED.items(), bad_clients, strict=True):
        assert bad.close_code == aiohttp.WSCloseCode.UNSUPPORTED_DATA, what
        assert len(bad.errors) == 1 and bad.errors[0].startswith("malformed message"), what
    assert good.frames_received == len(pages) and good.errors == []
    assert stats["malformed"] == len(MALFORMED)
    assert sum("malformed message" in r.getMessage() for r in caplog.records) == len(MALFORMED)


class ServerProcess:
    """`moshi-fast serve` in a subprocess on a free port, the way a user starts it."""

    def __init__(self, *arguments: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moshi_fast", "serve", "--port", "0", *arguments],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = self._read_url(timeout=120)
        self.http = self.url.replace("ws://", "http://").rsplit("/api/chat", 1)[0]

    def _read_url(self, timeout: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if selector.select(timeout=0.5):
                line = self.process.stdout.readline()
                if line.startswith("listening on "):
                    return line.split()[2]
        self.process.kill()
        raise AssertionError(f"the server did not start: {self.process.communicate()[1][-3000:]}")

    def stats(self, after_step: int = 0) -> dict:
        with urllib.request.urlopen(f"{self.http}/api/stats?after={after_step}", timeout=10) as response:
            return json.load(response)

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return self.process.returncode, stderr


@pytest.fixture(scope="module")
def server16():
    # On 2 shared cores the tiny engine's step at 16 conversations takes 90-150 ms, so the server falls
    # behind real time; a long input backlog keeps every client's audio until it catches up.
    server = ServerProcess("--device", "cpu", "--preset", "tiny", "--max-conversations", "16",
                           "--input-backlog", "20")
    yield server
    if server.process.poll() is None:
        server.stop()


def test_loadtest_reports_server_frame_times(server16, tmp_path):
    report = loadtest.load_test(server16.url, clients=3, seconds=1.0, processes=1, drain_s=10.0)

    assert report["connected"] == 3 and report["errors"] == 0 and report["refused"] == 0
    assert report["received_ratio"]["min"] >= 0.9
    server = report["server"]
    assert server["measured_steps"] >= 10 and server["frame_ms"]["p99"] > 0
    assert 0 < server["engine_ms"]["p50"] <= server["frame_ms"]["p50"]
    assert json.loads(json.dumps(report)) == report


def test_16_clients_with_abrupt_disconnects_and_malformed_messages(server16):
    """10 clients stream 4 s in real time while 2 vanish mid-stream and 4 send malformed messages."""
    good_seconds = 4.0
    signals = [audio.test_signal(good_seconds, RATE, seed=i) for i in range(16)]
    pages = [opus_pages(signal_) for signal_ in signals]
    roles = ["good"] * 10 + ["fin", "reset"] + list(MALFORMED)
    before = server16.stats()

    async def client_run(session, role, index, start):
        client = KyutaiClient(session, server16.url)
        first = await client.connect()
        if role == "good":
            await client.stream(pages[index], start)
            client.window = (start + 1.0, time.perf_counter())
            await client.wait_for_frames(len(pages[index]), timeout=20)
            await client.close()
        elif role in ("fin", "reset"):
            await client.stream(pages[index][:15], start)
            await client.abort(reset=role == "reset")
        else:
            await client.stream(pages[index][:10], start)
            await MALFORMED[role](client.ws)
            await client.wait_closed(10)
        return first, client

    async def body():
        sessions = [aiohttp.ClientSession() for _ in roles]
        try:
            start = time.perf_counter() + 1.0
            results = await asyncio.gather(*(client_run(sessions[i], role, i, start)
                                             for i, role in enumerate(roles)))
        finally:
            await asyncio.gather(*(session.close() for session in sessions))
        return results

    results = run(body(), timeout=90)
    deadline = time.monotonic() + 15
    while (stats := server16.stats())["open_slots"] and time.monotonic() < deadline:
        time.sleep(0.1)

    assert server16.process.poll() is None, "the server exited"
    assert stats["open_slots"] == [] and stats["conversations"] == 0
    assert stats["accepted"] - before["accepted"] == 16 and stats["refused"] == before["refused"]
    assert stats["malformed"] - before["malformed"] == len(MALFORMED)
    assert all(first == b"\x00" for first, _ in results)
    # On a small shared CPU the tiny engine's batched step itself can take longer than the 80 ms frame
    # (measured on 2 cores: 87-142 ms p50 at 11 slots, varying from run to run), so the clock ticks at
    # the engine's pace: a good client keeps its frame rate when it gets a frame on (nearly) every tick.
    tick_s = max(FRAME_S, server16.stats(after_step=before["steps"])["tick_interval_ms"]["p50"] / 1000)
    for role, (_, client) in zip(roles, results, strict=True):
        if role == "good":
            # From 1 s in (when the others start to vanish or misbehave) to its last frame sent; a stall of
            # a second or more would cost a third of the window's frames.
            opened, closed = client.window
            in_window = sum(opened <= t <= closed for t in client.audio_times)
            assert in_window >= 0.8 * (closed - opened) / tick_s, role
            assert client.frames_received == len(pages[0]) and client.errors == [], role
        elif role in MALFORMED:
            assert client.close_code == aiohttp.WSCloseCode.UNSUPPORTED_DATA, role
            assert client.errors and client.errors[0].startswith("malformed message"), role

    # Still serving: a fresh client gets the handshake and audio.
    async def fresh():
        async with aiohttp.ClientSession() as session:
            client = KyutaiClient(session, server16.url)
            assert await client.connect() == b"\x00"
            await client.stream(opus_pages(audio.test_signal(0.4, RATE)))
            await client.wait_for_frames(5, timeout=10)
            await client.close()
            return client

    assert run(fresh()).frames_received == 5
    code, stderr = server16.stop()
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("malformed message") == len(MALFORMED)


