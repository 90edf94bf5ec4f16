"""The `moshi-fast loadtest` command: many concurrent clients against a Kyutai-protocol server.

Each client does what Kyutai's `moshi.client` does (an aiohttp websocket to /api/chat, one Ogg/Opus page
of 1920 samples every 80 ms through `sphn`, decoding the audio it gets back), streaming a voice-like test
signal in real time. The clients are spread over worker processes so that their Opus work does not
slow the server down when both share a machine. The report combines what the clients measured with
the server's frame times from `/api/stats` over the same interval.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
import urllib.request
from dataclasses import asdict, dataclass

import aiohttp
import numpy as np
import sphn

from . import audio
from .server import AUDIO, CHAT_PATH, ERROR, HANDSHAKE, STATS_PATH, TEXT

SAMPLE_RATE = 24000
FRAME_SIZE = 1920


@dataclass
class ClientReport:
    """What one client saw. Frames are 1920-sample frames of decoded audio."""

    connected: bool
    refusal: str | None = None
    frames_sent: int = 0
    frames_received: int = 0
    text_pieces: int = 0
    streaming_s: float = 0.0
    first_audio_ms: float | None = None
    error: str | None = None


def opus_pages(pcm: np.ndarray) -> list[bytes]:
    """Encodes pcm [T] float32 at 24 kHz as one Ogg/Opus stream, one chunk of bytes per 1920-sample frame
    (the first carries the stream headers); the tail is zero-padded to a whole frame."""
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    return [writer.append_pcm(frame) for frame in audio.frames(pcm.astype(np.float32), FRAME_SIZE)]


async def stream_client(session: aiohttp.ClientSession, url: str, pages: list[bytes],
                        drain_s: float = 1.0) -> ClientReport:
    """Connects, waits for the handshake, sends one page per 80 ms while receiving, then waits up to
    drain_s for the last frames and closes."""
    frame_s = FRAME_SIZE / SAMPLE_RATE
    try:
        async with session.ws_connect(url) as ws:
            first = await asyncio.wait_for(ws.receive(), timeout=30)
            if first.type != aiohttp.WSMsgType.BINARY or not first.data:
                return ClientReport(connected=False, error=f"no handshake: {first.type.name}")
            if first.data[0] == ERROR:
                return ClientReport(connected=False, refusal=first.data[1:].decode("utf-8", "replace"))
            if first.data[0] != HANDSHAKE:
                return ClientReport(connected=False, error=f"first message of kind {first.data[0]}")
            report = ClientReport(connected=True)
            reader = sphn.OpusStreamReader(SAMPLE_RATE)
            samples = 0
            start = time.perf_counter()

            async def receive() -> None:
                nonlocal samples
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.BINARY or not message.data:
                        continue
                    if message.data[0] == AUDIO:
                        samples += reader.append_bytes(message.data[1:]).shape[-1]
                        if report.first_audio_ms is None:
                            report.first_audio_ms = 1000 * (time.perf_counter() - start)
                    elif message.data[0] == TEXT:
                        report.text_pieces += 1
                    elif message.data[0] == ERROR:
                        report.error = message.data[1:].decode("utf-8", "replace")

            receiver = asyncio.create_task(receive())
            for index, page in enumerate(pages):
                await asyncio.sleep(max(0.0, start + index * frame_s - time.perf_counter()))
                await ws.send_bytes(bytes([AUDIO]) + page)
                report.frames_sent += 1
            report.streaming_s = time.perf_counter() - start
            deadline = time.perf_counter() + drain_s
            expected = len(pages) * FRAME_SIZE
            while samples < expected and time.perf_counter() < deadline and not receiver.done():
                await asyncio.sleep(0.05)
            report.frames_received = samples // FRAME_SIZE
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            return report
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
        return ClientReport(connected=False, error=f"{type(e).__name__}: {e}")


async def run_clients(url: str, clients: int, seconds: float, stagger_s: float = 0.01,
                      seed: int = 0, drain_s: float = 1.0) -> list[ClientReport]:
    """`clients` concurrent `stream_client`s, each streaming `seconds` of its own test signal, started
    stagger_s apart, each waiting up to drain_s after its last page for the rest of its audio."""
    pages = [opus_pages(audio.test_signal(seconds, SAMPLE_RATE, seed=seed + i)) for i in range(clients)]

    async def delayed(index: int, session: aiohttp.ClientSession) -> ClientReport:
        await asyncio.sleep(index * stagger_s)
        return await stream_client(session, url, pages[index], drain_s)

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(delayed(i, session) for i in range(clients))))


def _client_process(url: str, clients: int, seconds: float, seed: int, drain_s: float) -> list[dict]:
    return [asdict(report) for report in asyncio.run(run_clients(url, clients, seconds, seed=seed,
                                                                 drain_s=drain_s))]


def fetch_stats(chat_url: str, after_step: int = 0) -> dict:
    """The server's /api/stats for the server of a ws://host:port/api/chat URL."""
    base = chat_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1).removesuffix(CHAT_PATH)
    with urllib.request.urlopen(f"{base}{STATS_PATH}?after={after_step}", timeout=10) as response:
        return json.load(response)


def load_test(url: str, clients: int, seconds: float, processes: int = 1, drain_s: float = 1.0) -> dict:
    """Runs `clients` concurrent clients for `seconds`, spread over `processes` worker processes, and
    returns a JSON-ready report: per-client frame counts, a summary, and the server's frame times over
    the run (p50/p90/p99 of one engine step, and of the interval between steps). drain_s: how long each
    client waits after its last page for the audio still owed to it (a server slower than real time
    owes more)."""
    if clients < 1 or processes < 1 or seconds <= 0 or drain_s < 0:
        raise ValueError("clients and processes must be >= 1, seconds > 0 and drain_s >= 0")
    processes = min(processes, clients)
    before = fetch_stats(url)
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    seeds = np.cumsum([0] + shares[:-1]).tolist()
    start = time.perf_counter()
    if processes == 1:
        reports = _client_process(url, clients, seconds, 0, drain_s)
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            jobs = [(url, share, seconds, seed, drain_s) for share, seed in zip(shares, seeds, strict=True)]
            parts = pool.starmap(_client_process, jobs)
        reports = [report for part in parts for report in part]
    wall_s = time.perf_counter() - start
    server = fetch_stats(url, after_step=before["steps"])
    connected = [r for r in reports if r["connected"]]
    ratios = [r["frames_received"] / r["frames_sent"] for r in connected if r["frames_sent"]]
    return {
        "url": url,
        "clients": clients,
        "processes": processes,
        "seconds": seconds,
        "drain_s": drain_s,
        "wall_s": wall_s,
        "connected": len(connected),
        "refused": sum(r["refusal"] is not None for r in reports),
        "errors": sum(r["error"] is not None for r in reports),
        "received_ratio": {"min": min(ratios, default=None),
                           "mean": float(np.mean(ratios)) if ratios else None},
        "first_audio_ms_max": max((r["first_audio_ms"] for r in connected if r["first_audio_ms"] is not None),
                                  default=None),
        "server": server,
        "client_reports": reports,
    }


def format_report(report: dict) -> str:
    server = report["server"]
    frame, engine, tick = server["frame_ms"], server["engine_ms"], server["tick_interval_ms"]

    def ms(value) -> str:
        return "n/a" if value is None else f"{value:.1f} ms"

    ratio = report["received_ratio"]
    return "\n".join([
        f"clients: {report['connected']}/{report['clients']} connected, {report['refused']} refused, "
        f"{report['errors']} with errors, {report['seconds']:g} s of audio each",
        f"frames received / sent: min {ratio['min'] or 0:.2f}, mean {ratio['mean'] or 0:.2f}",
        f"server frame time over {server['measured_steps']} steps (mean batch {server['mean_batch']:.1f}): "
        f"p50 {ms(frame['p50'])}, p90 {ms(frame['p90'])}, p99 {ms(frame['p99'])}, max {ms(frame['max'])}",
        f"  of which inside the engine's thread: p50 {ms(engine['p50'])}, p90 {ms(engine['p90'])}, "
        f"p99 {ms(engine['p99'])}, max {ms(engine['max'])}",
        f"interval between steps: p50 {ms(tick['p50'])}, p99 {ms(tick['p99'])} "
        f"(budget {server['budget_ms']:.0f} ms)",
    ])


def run_load_test(url: str, clients: int, seconds: float, processes: int, output=None, drain_s: float = 1.0) -> int:
    """The `moshi-fast loadtest` command: prints the summary and writes the JSON report to `output`."""
    report = load_test(url, clients, seconds, processes, drain_s)
    print(format_report(report))
    if output is not None:
        output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {output}")
    return 0 if report["connected"] == clients and report["errors"] == 0 else 1
