"""A websocket server speaking Kyutai's Moshi protocol, serving many conversations on one `FastMoshi`.

Kyutai's clients (the `moshi.client` command line, the web UI) work unchanged. The protocol: a websocket
at `GET /api/chat` carrying binary messages whose first byte is the kind:

    0x00  handshake, server -> client, no payload: the conversation is ready
    0x01  audio, both directions: Ogg/Opus pages, 24 kHz mono
    0x02  text, server -> client: a UTF-8 text piece (padding tokens send nothing)
    0x05  error, server -> client: a UTF-8 reason, sent before the server closes the connection

The kinds of Kyutai's web protocol that carry nothing for this server (3 control, 4 metadata, 6 ping)
are accepted and ignored; any other kind, an empty or text message, or audio that is not Ogg/Opus
closes that connection only, with a log line.

Scheduling: each connection holds one engine slot. One frame clock ticks every 80 ms; at each tick every
connection with a whole frame of decoded input contributes it, and one `engine.step({slot: frame})` runs
them all in a worker thread, so the event loop keeps serving sockets meanwhile. A connection whose input
lags skips the tick and keeps its state. Opus coding runs in worker processes (`OpusWorkers`: sphn holds
the GIL while it codes, 1-2.5 ms per frame and connection to encode, which at dozens of connections
would starve the event loop and the engine's thread): incoming pages are decoded as they arrive, and
Moshi's output is encoded while the next step runs. With opus_processes=0 the event loop decodes and a
thread of the server's process encodes. Output is queued per connection, and a client that reads too
slowly loses its oldest queued audio, never delaying the clock or the other clients.

`GET /api/stats` returns the server's counters and frame-time percentiles as JSON.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sphn
from aiohttp import WSCloseCode, WSMsgType, web

from .engine import FastMoshi, SlotsBusyError
from .opus_worker import read_message, write_message

log = logging.getLogger("moshi_fast.server")

HANDSHAKE, AUDIO, TEXT, ERROR = 0, 1, 2, 5
IGNORED_KINDS = frozenset({3, 4, 6})
"""Kinds of Kyutai's web protocol (control, metadata, ping) that carry nothing this server acts on."""

CHAT_PATH = "/api/chat"
STATS_PATH = "/api/stats"


class PcmBuffer:
    """A client's decoded input audio not yet stepped: float32 samples, at most `max_samples` of them
    (the oldest are dropped beyond that, which bounds latency when a client sends faster than real time)."""

    def __init__(self, max_samples: int):
        self.max_samples = max_samples
        self._pcm = np.zeros(0, dtype=np.float32)
        self.dropped = 0

    def __len__(self) -> int:
        return self._pcm.shape[0]

    def push(self, pcm: np.ndarray) -> None:
        """Appends pcm [T] float32."""
        pcm = np.concatenate([self._pcm, pcm.astype(np.float32, copy=False)])
        excess = pcm.shape[0] - self.max_samples
        if excess > 0:
            self.dropped += excess
            pcm = pcm[excess:]
        self._pcm = pcm

    def pop(self, count: int) -> np.ndarray:
        """Removes and returns the oldest `count` samples, [count] float32; needs len(self) >= count."""
        if count > len(self):
            raise ValueError(f"only {len(self)} samples buffered, {count} requested")
        chunk, self._pcm = self._pcm[:count].copy(), self._pcm[count:]
        return chunk


class Outbox:
    """Messages queued for one client, at most `capacity`. When full, the oldest audio message is dropped
    (never the first, which carries the Ogg/Opus stream headers), or the oldest text piece if no audio is
    queued: a slow client loses audio instead of holding back the frame clock."""

    def __init__(self, capacity: int):
        if capacity < 2:
            raise ValueError("an outbox needs room for at least 2 messages")
        self.capacity = capacity
        self._messages: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._ready = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, message: bytes, droppable: bool = True) -> None:
        if len(self._messages) >= self.capacity:
            self._drop_one()
        self._messages.append((message, droppable))
        self._ready.set()

    def _drop_one(self) -> None:
        candidates = [i for i, (message, droppable) in enumerate(self._messages) if droppable]
        audio = [i for i in candidates if self._messages[i][0][0] == AUDIO]
        victim = (audio or candidates)[0]
        del self._messages[victim]
        self.dropped += 1

    async def get(self) -> bytes:
        """Waits for and removes the oldest message."""
        while not self._messages:
            self._ready.clear()
            await self._ready.wait()
        return self._messages.popleft()[0]


@dataclass(eq=False)
class Conversation:
    """One client connection and its engine slot."""

    id: int
    peer: str
    ws: web.WebSocketResponse
    slot: int
    inbox: PcmBuffer
    outbox: Outbox
    opus_reader: sphn.OpusStreamReader | None
    opus_writer: sphn.OpusStreamWriter | None
    """Both code in the server's process (opus_processes=0); None when worker processes do."""
    closed: bool = False
    ending: bool = False
    """Being closed by the server (malformed audio, a lost Opus stream): further audio is ignored."""
    frames_out: int = 0
    header_queued: bool = False
    sender: asyncio.Task | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"conversation {self.id} ({self.peer}, slot {self.slot})"


class OpusWorkerDied(RuntimeError):
    """An Opus worker process exited; `conversations` lost their streams (the worker is restarted for
    the others)."""

    def __init__(self, message: str, conversations: set[int]):
        super().__init__(message)
        self.conversations = conversations


class OpusWorkers:
    """Ogg/Opus coding of the conversations' audio, both ways, in `processes` worker processes
    (moshi_fast/opus_worker.py, run by path with this interpreter). A conversation's audio always goes to
    the same worker, so its streams
    stay in order; each worker has one thread here that owns its process and sends its requests and
    reads its replies one at a time, in submission order. A worker that dies is restarted; the
    conversations whose streams it held fail (OpusWorkerDied), later ones encode on the new process."""

    def __init__(self, processes: int, sample_rate: int):
        self._command = [sys.executable, str(Path(__file__).with_name("opus_worker.py")), str(sample_rate)]
        self._processes = [self._start() for _ in range(processes)]
        for process in self._processes:
            self._wait_ready(process)
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"moshi-opus-{i}") for i in range(processes)]
        self._streams: list[set[int]] = [set() for _ in range(processes)]
        self._lost: list[set[int]] = [set() for _ in range(processes)]

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    @staticmethod
    def _wait_ready(process: subprocess.Popen) -> None:
        """Blocks until a started worker has imported its codec, so the first frames wait for nothing."""
        if read_message(process.stdout) != "ready":
            raise RuntimeError(f"an Opus worker failed to start (exit code {process.wait()})")

    def worker_of(self, conversation_id: int) -> int:
        return conversation_id % len(self._processes)

    def encode(self, worker: int, frames: list[tuple[int, np.ndarray]]) -> Future:
        """Queues frames [(conversation id, pcm float32 [n])] for `worker`; the future gives their Ogg/Opus
        bytes, in order."""
        return self._threads[worker].submit(self._encode, worker, frames)

    def decode(self, conversation_id: int, data: bytes) -> Future:
        """Queues a conversation's incoming Ogg/Opus bytes; the future gives the pcm float32 [n] they
        complete (n is often 0), or raises ValueError for bytes that are not Ogg/Opus."""
        worker = self.worker_of(conversation_id)
        return self._threads[worker].submit(self._decode, worker, conversation_id, data)

    def forget(self, conversation_id: int) -> None:
        """Drops a conversation's stream once the frames queued for it are encoded."""
        worker = self.worker_of(conversation_id)
        self._threads[worker].submit(self._forget, worker, conversation_id)

    def _forget(self, worker: int, conversation_id: int) -> None:
        self._lost[worker].discard(conversation_id)
        if conversation_id in self._streams[worker]:
            self._streams[worker].discard(conversation_id)
            try:
                write_message(self._processes[worker].stdin, ("close", conversation_id))
            except OSError:
                pass

    def _encode(self, worker: int, frames: list[tuple[int, np.ndarray]]) -> list[bytes]:
        reply = self._round_trip(worker, {conversation for conversation, _ in frames}, ("encode", frames))
        return [opus for _, opus in reply]

    def _decode(self, worker: int, conversation_id: int, data: bytes) -> np.ndarray:
        status, value = self._round_trip(worker, {conversation_id}, ("decode", (conversation_id, data)))
        if status == "error":
            raise ValueError(value)
        return value

    def _round_trip(self, worker: int, ids: set[int], request):
        """Sends one request about conversations `ids` and returns the worker's answer."""
        if ids & self._lost[worker]:
            raise OpusWorkerDied(f"Opus worker {worker} lost these streams when it died", ids & self._lost[worker])
        process = self._processes[worker]
        reply = None
        try:
            write_message(process.stdin, request)
            reply = read_message(process.stdout)
        except OSError:
            pass
        if reply is None:
            process.kill()
            code = process.wait()
            lost = self._streams[worker] | ids
            self._lost[worker] |= lost
            self._streams[worker] = set()
            self._processes[worker] = self._start()
            self._wait_ready(self._processes[worker])
            raise OpusWorkerDied(f"Opus worker {worker} exited with code {code} and was restarted", lost)
        self._streams[worker] |= ids
        return reply

    def shutdown(self) -> None:
        """Lets queued work finish, then ends the workers (they exit when their stdin closes)."""
        for thread in self._threads:
            thread.shutdown(wait=True)
        for process in self._processes:
            try:
                process.stdin.close()
            except OSError:
                pass
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def default_opus_processes(engine: FastMoshi) -> int:
    """For an engine on a GPU, one Opus worker process per 8 conversations, leaving a core to the server's
    own process. 0 for an engine on the CPU: its step keeps every core busy, so worker processes would
    compete with it for the cores rather than use idle ones."""
    if engine.device.type == "cpu":
        return 0
    return max(1, min(-(-engine.max_batch // 8), (os.cpu_count() or 2) - 1))


class ProtocolError(Exception):
    """A client message that breaks the protocol; the connection is closed with a log line."""


class MoshiServer:
    """Serves up to `engine.max_batch` concurrent Kyutai-protocol conversations on one `FastMoshi`.

    Use `await start(host, port)` / `await stop()` inside a running event loop (or `async with`), or
    `serve(...)` for a blocking server. `port=0` picks a free port; `start` returns the bound port.

    input_backlog_s: decoded input audio kept per client before its oldest samples are dropped.
    output_backlog: outgoing messages (audio pages and text pieces) queued per client before its
        oldest audio is dropped.
    heartbeat_s: websocket ping interval; a client that does not answer is disconnected.
    stats_window: how many recent frames `/api/stats` keeps timing records for.
    opus_processes: worker processes for the Opus coding (default: `default_opus_processes`); 0 decodes
        on the event loop and encodes in a thread of this process.
    """

    def __init__(self, engine: FastMoshi, input_backlog_s: float = 2.0, output_backlog: int = 50,
                 heartbeat_s: float = 10.0, stats_window: int = 10000, opus_processes: int | None = None):
        if opus_processes is not None and opus_processes < 0:
            raise ValueError(f"opus_processes must be >= 0, got {opus_processes}")
        self.engine = engine
        self.opus_processes = default_opus_processes(engine) if opus_processes is None else opus_processes
        self._opus_workers: OpusWorkers | None = None
        self.frame_size = engine.frame_size
        self.frame_s = engine.frame_size / engine.sample_rate
        self.input_backlog_samples = max(int(input_backlog_s * engine.sample_rate), engine.frame_size)
        self.output_backlog = output_backlog
        self.heartbeat_s = heartbeat_s
        self.counters = collections.Counter()
        # (step index, step_ms, interval_ms, batch, engine_ms): one record per engine step.
        self._frames: collections.deque[tuple[int, float, float, int, float]] = collections.deque(
            maxlen=stats_window)
        self._conversations: dict[int, Conversation] = {}
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task] = set()
        self._handlers: set[asyncio.Task] = set()
        self._engine_thread: ThreadPoolExecutor | None = None
        self._codec_thread: ThreadPoolExecutor | None = None
        self._clock: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(CHAT_PATH, self._handle_chat)
        app.router.add_get(STATS_PATH, self._handle_stats)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 8998) -> int:
        """Starts the frame clock and listens on host:port; returns the bound port."""
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        # One thread owns the engine: steps, opens and closes run there in submission order.
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="moshi-engine")
        self._codec_thread = ThreadPoolExecutor(1, thread_name_prefix="moshi-opus")
        if self.opus_processes:
            self._opus_workers = OpusWorkers(self.opus_processes, self.engine.sample_rate)
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.port = self._runner.addresses[0][1]
        self._clock = asyncio.create_task(self._run_clock(), name="moshi-frame-clock")
        log.info("serving %d conversations on ws://%s:%d%s", self.engine.max_batch, host, self.port,
                 CHAT_PATH)
        return self.port

    async def stop(self) -> None:
        """Closes every connection, stops the clock and frees every slot this server opened."""
        if self._runner is None:
            return
        self._clock.cancel()
        await asyncio.gather(self._clock, return_exceptions=True)
        closing = [conversation.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                   for conversation in self._conversations.values()]
        await asyncio.gather(*closing, return_exceptions=True)
        # Every handler frees its slot on the engine thread, which must outlive them; a handler still
        # opening its slot has no socket to close yet, so it is cancelled after a grace period.
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=5.0)
            for handler in pending:
                handler.cancel()
        await asyncio.gather(*self._handlers, *self._background, return_exceptions=True)
        await self._runner.cleanup()
        self._engine_thread.shutdown(wait=True)
        self._codec_thread.shutdown(wait=True)
        if self._opus_workers is not None:
            self._opus_workers.shutdown()
            self._opus_workers = None
        self._runner = None

    async def __aenter__(self) -> "MoshiServer":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @property
    def conversations(self) -> int:
        return len(self._conversations)

    def stats(self, after_step: int = 0) -> dict:
        """Counters and timings. Frame times are over the recorded steps with index > after_step
        (pass a previous `stats()["steps"]` to measure an interval): `frame_ms` is the wall time of
        one engine step as the frame clock sees it (from submitting the step to resuming after it),
        `engine_ms` the same step timed inside the engine's thread (the difference is time spent
        waiting for that thread or for the event loop), `tick_interval_ms` the time between the starts
        of consecutive steps."""
        records = [r for r in self._frames if r[0] > after_step]
        steps = np.array([r[1] for r in records])
        intervals = np.array([r[2] for r in records if r[2] > 0])
        engine_steps = np.array([r[4] for r in records])
        return {
            "conversations": self.conversations,
            "max_conversations": self.engine.max_batch,
            "open_slots": self.engine.open_slots,
            "steps": self.counters["steps"],
            "accepted": self.counters["accepted"],
            "refused": self.counters["refused"],
            "malformed": self.counters["malformed"],
            "dropped_input_s": self.counters["dropped_input_samples"] / self.engine.sample_rate,
            "dropped_messages": self.counters["dropped_messages"] + sum(
                conversation.outbox.dropped for conversation in self._conversations.values()),
            "opus_processes": self.opus_processes,
            "budget_ms": 1000 * self.frame_s,
            "measured_steps": len(records),
            "mean_batch": float(np.mean([r[3] for r in records])) if records else 0.0,
            "frame_ms": _percentiles(steps),
            "engine_ms": _percentiles(engine_steps),
            "tick_interval_ms": _percentiles(intervals),
        }

    async def _handle_stats(self, request: web.Request) -> web.Response:
        try:
            after_step = int(request.query.get("after", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="'after' must be an integer step index") from None
        return web.json_response(self.stats(after_step))

    async def _run_in_engine(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, function, *args)

    async def _handle_chat(self, request: web.Request) -> web.WebSocketResponse:
        handler = asyncio.current_task()
        self._handlers.add(handler)
        try:
            return await self._chat(request)
        finally:
            self._handlers.discard(handler)

    async def _chat(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=self.heartbeat_s, compress=False, timeout=2.0)
        await ws.prepare(request)
        peer = request.remote or "unknown peer"
        try:
            slot = await self._run_in_engine(self.engine.open)
        except SlotsBusyError:
            self.counters["refused"] += 1
            reason = f"server full: all {self.engine.max_batch} conversations are in use, try again later"
            log.warning("refused %s: %s", peer, reason)
            await _send_error_and_close(ws, reason, WSCloseCode.TRY_AGAIN_LATER)
            return ws
        conversation = Conversation(
            id=next(self._ids), peer=peer, ws=ws, slot=slot, inbox=PcmBuffer(self.input_backlog_samples),
            outbox=Outbox(self.output_backlog),
            opus_reader=None if self._opus_workers is not None else sphn.OpusStreamReader(self.engine.sample_rate),
            opus_writer=None if self._opus_workers is not None else sphn.OpusStreamWriter(self.engine.sample_rate))
        self.counters["accepted"] += 1
        try:
            await ws.send_bytes(bytes([HANDSHAKE]))
            self._conversations[conversation.id] = conversation
            conversation.sender = asyncio.create_task(self._send_loop(conversation))
            log.info("%s: connected", conversation.name)
            await self._receive_loop(conversation)
        except ProtocolError as e:
            await self._close_malformed(conversation, str(e))
        except ConnectionError as e:
            log.info("%s: connection lost: %s", conversation.name, e)
        finally:
            await self._end(conversation)
        return ws

    async def _receive_loop(self, conversation: Conversation) -> None:
        ws = conversation.ws
        while True:
            message = await ws.receive()
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if message.type == WSMsgType.ERROR:
                log.info("%s: connection error: %s", conversation.name, ws.exception())
                return
            if message.type != WSMsgType.BINARY:
                raise ProtocolError(f"expected a binary message, got a {message.type.name.lower()} message")
            self._handle_message(conversation, message.data)

    def _handle_message(self, conversation: Conversation, data: bytes) -> None:
        if not data:
            raise ProtocolError("empty message")
        kind = data[0]
        if kind in IGNORED_KINDS:
            return
        if kind != AUDIO:
            raise ProtocolError(f"unexpected message kind {kind}")
        if conversation.ending:
            return
        if self._opus_workers is None:
            try:
                pcm = conversation.opus_reader.append_bytes(data[1:])
            except ValueError as e:
                raise ProtocolError(f"audio is not an Ogg/Opus stream ({e})") from None
            self._push_input(conversation, pcm)
            return
        loop = asyncio.get_running_loop()
        decoding = self._opus_workers.decode(conversation.id, data[1:])
        # Done callbacks run in the worker's thread, in its order: the pcm reaches the inbox in order too.
        decoding.add_done_callback(lambda done: loop.call_soon_threadsafe(self._decoded, conversation, done))

    def _decoded(self, conversation: Conversation, decoding: Future) -> None:
        if conversation.closed or conversation.ending:
            return
        try:
            pcm = decoding.result()
        except OpusWorkerDied as e:
            self._close_lost(e)
        except ValueError as e:
            self._spawn(self._close_malformed(conversation, f"audio is not an Ogg/Opus stream ({e})"))
        else:
            self._push_input(conversation, pcm)

    def _push_input(self, conversation: Conversation, pcm: np.ndarray) -> None:
        if pcm.size:
            before = conversation.inbox.dropped
            conversation.inbox.push(pcm)
            self.counters["dropped_input_samples"] += conversation.inbox.dropped - before

    async def _close_malformed(self, conversation: Conversation, reason: str) -> None:
        """Closes a connection that broke the protocol, once, with a log line and the reason."""
        if conversation.ending:
            return
        conversation.ending = True
        self.counters["malformed"] += 1
        log.warning("%s: malformed message, closing: %s", conversation.name, reason)
        await _send_error_and_close(conversation.ws, f"malformed message: {reason}", WSCloseCode.UNSUPPORTED_DATA)

    def _close_lost(self, died: OpusWorkerDied) -> None:
        """Closes the conversations whose Opus streams died with a worker."""
        lost = [c for c in self._conversations.values() if c.id in died.conversations and not c.ending]
        if lost:
            log.error("%s; closing the conversations whose audio streams it held: %s", died,
                      [c.id for c in lost])
        for conversation in lost:
            conversation.ending = True
            self._spawn(_send_error_and_close(conversation.ws, "internal error", WSCloseCode.INTERNAL_ERROR))

    async def _send_loop(self, conversation: Conversation) -> None:
        try:
            while True:
                await conversation.ws.send_bytes(await conversation.outbox.get())
        except ConnectionError as e:
            log.info("%s: cannot send, closing: %s", conversation.name, e)
            await conversation.ws.close()

    async def _end(self, conversation: Conversation) -> None:
        """Forgets a connection and frees its slot, once, whatever ended it."""
        if conversation.closed:
            return
        conversation.closed = True
        self._conversations.pop(conversation.id, None)
        if conversation.sender is not None:
            conversation.sender.cancel()
            await asyncio.gather(conversation.sender, return_exceptions=True)
        # Queued behind any step that still includes this slot, so the slot is freed only after it.
        await self._run_in_engine(self.engine.close, conversation.slot)
        if self._opus_workers is not None:
            self._opus_workers.forget(conversation.id)
        self.counters["dropped_messages"] += conversation.outbox.dropped
        if not conversation.ws.closed:
            await conversation.ws.close()
        log.info("%s: ended after %d frames", conversation.name, conversation.frames_out)

    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        last_start = None
        while True:
            deadline += self.frame_s
            batch = {conversation: conversation.inbox.pop(self.frame_size)
                     for conversation in self._conversations.values()
                     if len(conversation.inbox) >= self.frame_size}
            if batch:
                start = time.perf_counter()
                interval_ms = 0.0 if last_start is None else 1000 * (start - last_start)
                last_start = start
                try:
                    out, engine_ms = await self._run_in_engine(_timed, self.engine.step,
                                                               {c.slot: f for c, f in batch.items()})
                except Exception:
                    log.exception("engine step failed; closing the conversations it carried")
                    for conversation in batch:
                        self._spawn(_send_error_and_close(conversation.ws, "internal error",
                                                          WSCloseCode.INTERNAL_ERROR))
                else:
                    self.counters["steps"] += 1
                    self._frames.append((self.counters["steps"], 1000 * (time.perf_counter() - start),
                                         interval_ms, len(batch), engine_ms))
                    self._deliver({c.slot: c for c in batch}, out)
            else:
                last_start = None
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                # Behind schedule: start the next frame now rather than bursting to catch up.
                deadline = loop.time()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _deliver(self, by_slot: dict[int, Conversation], out) -> None:
        """Queues the Opus encoding of a step's output (row i of out.pcm [n, 1920] is for the conversation
        of slot out.slots[i]) and, for each group of conversations encoded together, a task that queues
        their audio and text once it is done. The encodings are queued here, in step order, so each
        conversation's frames stay in order."""
        pcm = out.pcm.numpy()
        rows = [(by_slot[slot], row, out.text[row] if out.text is not None else "")
                for row, slot in enumerate(out.slots)]
        if self._opus_workers is None:
            groups = [rows]
            encodings = [self._codec_thread.submit(_encode_in_process, [(c, pcm[row]) for c, row, _ in rows])]
        else:
            by_worker: dict[int, list] = collections.defaultdict(list)
            for conversation, row, text in rows:
                by_worker[self._opus_workers.worker_of(conversation.id)].append((conversation, row, text))
            groups = list(by_worker.values())
            encodings = [self._opus_workers.encode(worker, [(c.id, pcm[row]) for c, row, _ in group])
                         for worker, group in by_worker.items()]
        for group, encoding in zip(groups, encodings):
            self._spawn(self._queue_output(group, asyncio.wrap_future(encoding)))

    async def _queue_output(self, group: list[tuple[Conversation, int, str]], encoding) -> None:
        try:
            pages = await encoding
        except OpusWorkerDied as e:
            self._close_lost(e)
            return
        except Exception:
            log.exception("Opus encoding failed; closing the conversations it carried")
            for conversation, _, _ in group:
                self._spawn(_send_error_and_close(conversation.ws, "internal error", WSCloseCode.INTERNAL_ERROR))
            return
        for (conversation, _, text), page in zip(group, pages):
            if conversation.closed:
                continue
            conversation.frames_out += 1
            if page:
                conversation.outbox.put(bytes([AUDIO]) + page, droppable=conversation.header_queued)
                conversation.header_queued = True
            if text:
                conversation.outbox.put(bytes([TEXT]) + text.encode("utf-8"))


def _encode_in_process(frames: list[tuple[Conversation, np.ndarray]]) -> list[bytes]:
    """Each conversation's next Ogg/Opus bytes for its pcm [1920], with its own stream writer."""
    return [conversation.opus_writer.append_pcm(pcm) for conversation, pcm in frames]


async def _send_error_and_close(ws: web.WebSocketResponse, reason: str, code: int) -> None:
    try:
        await ws.send_bytes(bytes([ERROR]) + reason.encode("utf-8"))
    except ConnectionError:
        pass
    await ws.close(code=code, message=reason.encode("utf-8")[:120])


def _percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "max": float(values.max())}


def _timed(function, *args):
    """(function(*args), its wall time in ms), measured in the calling thread."""
    start = time.perf_counter()
    result = function(*args)
    return result, 1000 * (time.perf_counter() - start)


def serve(engine: FastMoshi, host: str = "127.0.0.1", port: int = 8998, **options) -> None:
    """Runs a `MoshiServer` until SIGINT or SIGTERM; prints the websocket URL once it listens.
    options: the keyword arguments of `MoshiServer`."""

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        async with MoshiServer(engine, **options) as server:
            bound = await server.start(host, port)
            print(f"listening on ws://{host}:{bound}{CHAT_PATH} ({engine.max_batch} conversations)",
                  flush=True)
            await stopping.wait()
            log.info("stopping")

    asyncio.run(main())
