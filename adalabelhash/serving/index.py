"""Hamming k-NN over packed codes with faiss: exact up to a size, IVF above it.

Tie order (documented, stable): nearest first, items at equal distance by database position,
which is ascending manifest row id. faiss orders ties its own way, so the exact index fetches
more than k and, when the k-th distance's tie group may continue past what came back, all
items within that distance (range search), then sorts by (distance, position).
IVF is approximate: the same order is applied to what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adalabelhash.codes import asymmetric_distances
from adalabelhash.errors import UserError


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
        k = min(k, len(self))
        fetch = min(len(self), 2 * k + 32)
        distances, positions = self.index.search(query_codes, fetch)
        out = []
        for row, (d, p) in enumerate(zip(distances, positions)):
            found = p >= 0
            d, p = d[found], p[found]
            if self.exact and len(d) == fetch < len(self) and d[-1] == d[k - 1]:
                # the k-th distance's tie group may go on past what faiss returned: take all of it
                _, d, p = self.index.range_search(query_codes[row : row + 1], int(d[k - 1]) + 1)
            order = np.lexsort((p, d))[:k]
            out.append((d[order].astype(np.int64), p[order].astype(np.int64)))
        return out

    def search_reranked(self, query_real: np.ndarray, k: int, rerank: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The top max(k, rerank) by Hamming distance, reordered by asymmetric distance of the
        real-valued query code (ties: Hamming distance, then position); k of them per query:
        (Hamming distances, positions, asymmetric distances)."""
        from adalabelhash.codes import pack_codes

        out = []
        for real, (d, p) in zip(query_real, self.search(pack_codes(query_real), max(k, rerank))):
            asym = asymmetric_distances(real[None, :], self.codes[p])[0]
            order = np.lexsort((p, d, asym))[:k]
            out.append((d[order], p[order], asym[order]))
        return out
