"""Hamming k-NN over packed codes with faiss: exact up to a size, IVF above it.

Tie order (documented, stable): nearest first, items at equal distance by database position,
which is ascending manifest row id. faiss's k-selection heaps break distance ties by id
(`CMax::cmp2`), so one scan returns exactly the first k in that order: no over-fetch, no
second pass (tests/test_serve.py checks it against numpy on codes where every distance ties).
IVF is approximate: the same order over the lists it visits.
The order is total, so the first k of a search for k' >= k are the answer for k: a batch of
queries with different k is one search for the largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adalabelhash.codes import asymmetric_distances
from adalabelhash.errors import UserError


@dataclass(frozen=True)
class Query:
    code: np.ndarray  # packed bits, (bits / 8,) uint8
    k: int
    real: np.ndarray | None = None  # the tanh outputs (image queries): needed for rerank
    rerank: int = 0


@dataclass(frozen=True)
class IndexParams:
    flat_max: int = 2_000_000  # codes up to this count: exact IndexBinaryFlat; above: IndexBinaryIVF
    nlist: int = 1024  # IVF inverted lists
    nprobe: int = 32  # IVF lists visited per query (recall vs speed: benchmarks/serve)
    threads: int = 1  # faiss OpenMP threads per search; the service runs requests in parallel itself

    def __post_init__(self):
        if min(self.flat_max, self.nlist, self.nprobe, self.threads) < 1:
            raise ValueError("flat_max, nlist, nprobe and threads must be >= 1")


class CodeIndex:
    def __init__(self, codes: np.ndarray, params: IndexParams = IndexParams()):
        import faiss

        self.threads = params.threads
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.codes, self.bits = codes, 8 * codes.shape[1]
        self.exact = len(codes) <= params.flat_max
        if self.exact:
            self.index = faiss.IndexBinaryFlat(self.bits)
        else:
            faiss.omp_set_num_threads(params.threads)
            nlist = min(params.nlist, max(1, len(codes) // 39))  # faiss wants >= 39 training points per list
            self.quantizer = faiss.IndexBinaryFlat(self.bits)  # kept referenced: the IVF index does not own it
            self.index = faiss.IndexBinaryIVF(self.quantizer, self.bits, nlist)
            sample = np.random.default_rng(0).choice(len(codes), min(len(codes), 64 * nlist), replace=False)
            self.index.train(codes[np.sort(sample)])
            self.index.nprobe = min(params.nprobe, nlist)
        self.index.add(codes)

    @property
    def kind(self) -> str:
        return "flat" if self.exact else f"ivf{self.index.nlist}-nprobe{self.index.nprobe}"

    def __len__(self) -> int:
        return len(self.codes)

    def search(self, query_codes: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (Hamming distances, database positions) of its k nearest, in the stable order."""
        query_codes = np.ascontiguousarray(query_codes, dtype=np.uint8)
        if query_codes.ndim != 2 or 8 * query_codes.shape[1] != self.bits:
            raise UserError(f"query codes of shape {query_codes.shape} do not fit {self.bits}-bit codes")
        import faiss

        # OpenMP's thread count is per calling thread: set it in the request's own thread, or faiss
        # uses every core per call and, on a busy machine, waits tens of ms for them to be scheduled
        faiss.omp_set_num_threads(self.threads)
        distances, positions = self.index.search(query_codes, min(k, len(self)))
        out = []
        for d, p in zip(distances, positions):
            found = p >= 0  # IVF: fewer than k in the visited lists
            out.append((d[found].astype(np.int64), p[found].astype(np.int64)))
        return out

    def answer(self, queries: list[Query]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """A batch of queries in one faiss call, for the widest of them; per query: (Hamming
        distances, positions, asymmetric distances or None) of its k nearest. With `rerank`, the
        top max(k, rerank) by Hamming distance are reordered by the asymmetric distance of the
        query's real-valued code (ties: Hamming distance, then position)."""
        widest = max(max(query.k, query.rerank) for query in queries)
        found = self.search(np.stack([query.code for query in queries]), widest)
        out = []
        for query, (d, p) in zip(queries, found):
            if not query.rerank:
                out.append((d[: query.k], p[: query.k], None))
                continue
            shortlist = max(query.k, query.rerank)
            d, p = d[:shortlist], p[:shortlist]
            asym = asymmetric_distances(query.real[None, :], self.codes[p])[0]
            order = np.lexsort((p, d, asym))[: query.k]
            out.append((d[order], p[order], asym[order]))
        return out
