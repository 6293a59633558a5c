"""The HTTP floor under `adalabelhash serve`: server CPU per request of a route that only returns
a fixed 100-result JSON answer, as a bare Starlette route and as a FastAPI route with the
service's path and query parameters, each under uvicorn (uvloop + httptools) on 127.0.0.1,
queried like benchmarks/serve/run.py does (8 keep-alive `http.client` threads, 2,000 requests
after 200 to warm up).

  python benchmarks/serve/http_floor.py
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson

ANSWER = orjson.dumps({"model_version": "1", "results": [
    {"id": i, "label": "3", "path": f"3/{i:04d}.png", "distance": 3} for i in range(100)]})


def starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def search(request):
        return Response(ANSWER, media_type="application/json")

    return Starlette(routes=[Route("/search/{item_id}", search)])


def fastapi_app():
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.get("/search/{item_id}")
    async def search(item_id: int, k: int = 10):
        return Response(ANSWER, media_type="application/json")

    return app


def serve(kind: str, port: int) -> None:
    import uvicorn

    uvicorn.run(starlette_app() if kind == "starlette" else fastapi_app(), host="127.0.0.1", port=port,
                log_level="warning")


def measure(kind: str, clients: int = 8, requests: int = 2000) -> dict:
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)])
    local = threading.local()

    def call(i):
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            local.connection.connect()
            local.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local.connection.request("GET", f"/search/{i}?k=100")
        reply = local.connection.getresponse()
        assert reply.status == 200 and reply.read() == ANSWER

    try:
        for _ in range(100):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(call, range(200)))
        process = psutil.Process(server.pid)
        cpu_before, started = sum(process.cpu_times()[:2]), time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(call, range(requests)))
        seconds, cpu = time.perf_counter() - started, sum(process.cpu_times()[:2]) - cpu_before
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"app": kind, "qps": round(requests / seconds), "server_cpu_ms_per_request": round(1000 * cpu / requests, 3)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        for kind in ("starlette", "fastapi"):
            print(orjson.dumps(measure(kind)).decode(), flush=True)
