"""A TCP proxy on 127.0.0.1 that holds every request `--delay-ms` before passing it on: an S3 round
trip (10-50 ms) in front of a loopback store, which answers in well under a millisecond.

    python benchmarks/scale/latency_proxy.py --listen 9100 --upstream 9000 --delay-ms 20

Each chunk the client sends (an HTTP request: its headers, and its body when there is one) waits
`--delay-ms` before it is forwarded, in order; a new connection waits as long before it is opened
(the TCP handshake's round trip). Responses pass straight back. On SIGTERM/SIGINT it prints the
requests it saw (lines starting with an HTTP method) and the most connections open at once.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal

REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|HEAD|PUT|POST|DELETE) \S+ HTTP/1\.[01]\r\n")


class Proxy:
    def __init__(self, upstream: int, delay: float):
        self.upstream, self.delay = upstream, delay
        self.requests: dict[str, int] = {}
        self.open = self.peak = 0

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await asyncio.sleep(self.delay)
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            await asyncio.gather(self.pipe(client_reader, server_writer, delayed=True),
                                 self.pipe(server_reader, client_writer, delayed=False))
        finally:
            self.open -= 1
            client_writer.close()

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delayed:
                    for method in REQUEST_LINE.findall(data):
                        self.requests[method.decode()] = self.requests.get(method.decode(), 0) + 1
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def main(listen: int, upstream: int, delay_ms: float) -> None:
    proxy = Proxy(upstream, delay_ms / 1000)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", listen)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"listening on 127.0.0.1:{listen} -> 127.0.0.1:{upstream}, +{delay_ms} ms per request", flush=True)
    async with server:
        await stop.wait()
    print(f"requests {proxy.requests}, peak connections {proxy.peak}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.listen, args.upstream, args.delay_ms))
