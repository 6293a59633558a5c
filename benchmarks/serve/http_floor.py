"""The HTTP floor under `adalabelhash serve`: server CPU per request of a route that only returns
a fixed 100-result JSON answer, as a bare Starlette route and as a FastAPI route with the
service's path and query parameters, each under uvicorn (uvloop + httptools) on 127.0.0.1,
queried like benchmarks/serve/run.py does (8 keep-alive connections from the light client in
load.py, 2,000 requests after 200 to warm up).

  python benchmarks/serve/http_floor.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.serve.load import get_request, run_load  # noqa: E402

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
    try:
        for _ in range(100):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        run_load(port, [get_request(f"/search/{i}?k=100") for i in range(200)], clients)  # warm up
        process = psutil.Process(server.pid)
        cpu_before = sum(process.cpu_times()[:2])
        load = run_load(port, [get_request(f"/search/{i}?k=100") for i in range(requests)], clients, keep_answers=True)
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        assert all(answer == ANSWER for answer in load["answers"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"app": kind, "qps": round(requests / load["wall"]), "server_cpu_ms_per_request": round(1000 * cpu / requests, 3)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        for kind in ("starlette", "fastapi"):
            print(orjson.dumps(measure(kind)).decode(), flush=True)
