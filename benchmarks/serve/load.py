"""A light HTTP load client for the serving benchmarks: `clients` keep-alive connections on one
asyncio (uvloop) thread, each sending its next prepared request as soon as the previous answer
is read. On a 2-core machine the client shares the cores with the service: 8 `http.client`
threads cost 0.25-0.35 ms of CPU per request (mostly their GIL hand-offs), this ~0.05, so the
service under test gets the cores the raw in-process side gets. Bounded: exactly the requests
given, loopback only.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import numpy as np


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def upload_request(path: str, image: bytes, field: str = "image") -> bytes:
    """A multipart/form-data POST of one file field, as curl -F sends it."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="q.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _client(port: int, requests: list[bytes], next_index, latencies: np.ndarray, answers: list | None) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while (i := next_index()) < len(requests):
            started = time.perf_counter()
            writer.write(requests[i])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            body = await reader.readexactly(length)
            latencies[i] = time.perf_counter() - started
            if status != 200:
                raise RuntimeError(f"request {i}: HTTP {status}: {body[:300]!r}")
            if answers is not None:
                answers[i] = body
    finally:
        writer.close()


def run_load(port: int | list[int], requests: list[bytes], clients: int, keep_answers: bool = False) -> dict:
    """Send every request once over `clients` connections (round-robin over the ports, if several);
    latencies (s), wall and client CPU seconds, and the answers' bodies if asked."""
    import uvloop

    latencies = np.empty(len(requests))
    answers = [None] * len(requests) if keep_answers else None
    counter = iter(range(len(requests) + clients))

    async def main():
        ports = port if isinstance(port, list) else [port]
        await asyncio.gather(*(_client(ports[c % len(ports)], requests, lambda: next(counter), latencies, answers)
                               for c in range(min(clients, len(requests)))))

    cpu, started = time.process_time(), time.perf_counter()
    uvloop.run(main())
    return {"latencies": latencies, "wall": time.perf_counter() - started, "client_cpu": time.process_time() - cpu,
            "answers": answers}
