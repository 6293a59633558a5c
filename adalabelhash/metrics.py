"""Retrieval metrics over packed binary codes (mAP, mAP@k, P@N, radius precision, PR curves).

Relevance: a database item is relevant to a query iff they share at least one label
(`Yq · Ydbᵀ > 0`).

Ranking and ties. The database is ranked by Hamming distance. With K bits there are only
K + 1 distances, so tie groups hold thousands of items and the order inside a group decides
the score. Two policies:

- ``"expected"`` (default, tie-aware; McSherry & Najork 2008): every metric is its expected
  value over all orders of tied items. Everything follows from per-query, per-distance counts
  ``n[q, d]`` (database items at distance d) and ``r[q, d]`` (relevant ones), so no ranking is
  ever materialised. Full-ranking AP is exact and closed form: a tie group at ranks
  a+1..a+n holding r relevant items, with R_before relevant items ranked before it, adds
  ``Σ_{j=1..n} (r/n) (R_before + 1 + (j-1)(r-1)/(n-1)) / (a+j)`` (the fraction is 0 for n = 1)
  to the sum of precisions, which is a harmonic-number difference; AP = sum / R. AP@k keeps
  the positions <= k of the group straddling rank k and divides by the *expected* number of
  relevant items in the top k: a ratio of expectations, not the expectation of the per-order
  ratio. P@N and recall@N are exact expectations (they are linear in the tie order).
- ``"stable"`` (peer-comparable): the database is permuted once with a recorded seed, then
  each query's ranking is a stable sort by distance. AP@k is computed as DeepHash-pytorch's
  ``CalcTopMap``: mean over the relevant items in the top k of (relevant so far / rank), 0 for
  a query with none in the top k. ``topk=None`` is the full database (the peer's
  ``topk=-1`` silently drops the last item).

Shared definitions, both policies: mAP is the mean over ALL queries; a query with no
relevant item in the whole database has AP 0 and is counted in ``zero_relevant_queries``.
Cut-offs larger than the database are clipped to it, a radius above K to K. Precision within
Hamming radius r is (relevant with d <= r) / (items with d <= r), 0 for a query with nothing
within the radius (counted in ``empty_radius_queries``). Recall is averaged over the queries
that have at least one relevant item; precision over all queries.

Hamming distances come from packed codes viewed as uint64 words, ``np.bitwise_count(q ^ db)``,
in query chunks of bounded size: memory never holds an nq × ndb float matrix.
"""

from __future__ import annotations

import numpy as np

from adalabelhash.errors import UserError

TIE_POLICIES = ("expected", "stable")
CHUNK_MB = 8.0  # measured: chunks of a few MB beat 64 MB ones (benchmarks/metric_speed/README.md)


# ---------------------------------------------------------------------------- validation


def _check_codes(name: str, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise UserError(f"{name} must be packed uint8 codes (adalabelhash.codes.pack_bits), got dtype {codes.dtype}")
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise UserError(f"{name} must be a non-empty 2-D array (n, bits / 8), got shape {codes.shape}")
    return codes


def _check_labels(name: str, labels, rows: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0 or labels.shape[1] == 0:
        raise UserError(f"{name} must be a non-empty 2-D multi-hot array (n, classes), got shape {labels.shape}")
    if labels.shape[0] != rows:
        raise UserError(f"{name} has {labels.shape[0]} rows but its codes have {rows}")
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == bool) or not np.isin(labels, (0, 1)).all():
        raise UserError(f"{name} must hold only 0/1 values (multi-hot)")
    return labels.astype(bool, copy=False)


def _check_pair(query_codes, query_labels, db_codes, db_labels):
    query_codes = _check_codes("query codes", query_codes)
    db_codes = _check_codes("database codes", db_codes)
    if query_codes.shape[1] != db_codes.shape[1]:
        raise UserError(
            f"code widths differ: queries have {8 * query_codes.shape[1]} bits, database {8 * db_codes.shape[1]}"
        )
    query_labels = _check_labels("query labels", query_labels, query_codes.shape[0])
    db_labels = _check_labels("database labels", db_labels, db_codes.shape[0])
    if query_labels.shape[1] != db_labels.shape[1]:
        raise UserError(
            f"label widths differ: queries have {query_labels.shape[1]} classes, database {db_labels.shape[1]}"
        )
    return query_codes, query_labels, db_codes, db_labels


def _check_cutoffs(name: str, values) -> tuple[int, ...]:
    values = (values,) if np.isscalar(values) else tuple(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise UserError(f"{name} values must be positive integers, got {v!r}")
    return tuple(int(v) for v in values)


def _check_policy(tie_policy: str) -> None:
    if tie_policy not in TIE_POLICIES:
        raise UserError(f"unknown tie_policy {tie_policy!r}: use one of {', '.join(TIE_POLICIES)}")


# ---------------------------------------------------------------------------- distances


def _words(packed: np.ndarray) -> np.ndarray:
    """Packed uint8 (n, K/8) -> uint64 words (W, n), zero-padded; word w of every row contiguous."""
    n, width = packed.shape
    padded = np.zeros((n, -(-width // 8) * 8), np.uint8)
    padded[:, :width] = packed
    return np.ascontiguousarray(padded.view(np.uint64).T)


def _block_distances(q_words: np.ndarray, db_words: np.ndarray, bits: int) -> np.ndarray:
    """Hamming distances (rows, ndb) between word columns q_words (W, rows) and db_words (W, ndb)."""
    x = np.bitwise_xor(q_words[0][:, None], db_words[0])
    d = np.bitwise_count(x).astype(np.uint8 if bits < 256 else np.uint16, copy=False)
    for w in range(1, len(q_words)):
        d += np.bitwise_count(np.bitwise_xor(q_words[w][:, None], db_words[w], out=x))
    return d


def hamming_distances(query_packed, db_packed) -> np.ndarray:
    """Full (nq, ndb) int32 Hamming distance matrix; for small inputs (memory is nq × ndb)."""
    query_packed = _check_codes("query codes", query_packed)
    db_packed = _check_codes("database codes", db_packed)
    if query_packed.shape[1] != db_packed.shape[1]:
        raise UserError(f"code widths differ: {8 * query_packed.shape[1]} vs {8 * db_packed.shape[1]} bits")
    return _block_distances(_words(query_packed), _words(db_packed), 8 * db_packed.shape[1]).astype(np.int32)


# ---------------------------------------------------------------------------- relevance


class _Relevance:
    """Relevance blocks without an nq × ndb matrix: class ids when every row has exactly one
    label (one comparison per pair), else labels packed into uint64 words (AND per word)."""

    def __init__(self, query_labels: np.ndarray, db_labels: np.ndarray):
        self.single = bool((query_labels.sum(1) == 1).all() and (db_labels.sum(1) == 1).all())
        if self.single:
            self.query, self.db = query_labels.argmax(1), db_labels.argmax(1)
        else:
            self.query = _words(np.packbits(query_labels, axis=1))
            self.db = _words(np.packbits(db_labels, axis=1))

    def block(self, start: int, stop: int) -> np.ndarray:
        if self.single:
            return np.equal(self.query[start:stop, None], self.db)
        shared = np.bitwise_and(self.query[0][start:stop, None], self.db[0])
        for w in range(1, len(self.query)):
            shared |= np.bitwise_and(self.query[w][start:stop, None], self.db[w])
        return shared != 0


def _count_block(d: np.ndarray, rel: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, r) counts (rows, K+1) from distances and relevance: one bincount over
    row * 2(K+1) + (K+1) * rel + d, in uint16 keys when they fit."""
    rows, bins = d.shape[0], 2 * (bits + 1)
    key_dtype = np.uint16 if rows * bins <= 1 << 16 else np.intp
    key = np.multiply(rel, bits + 1, dtype=key_dtype)
    key += d
    key += (np.arange(rows, dtype=key_dtype) * bins)[:, None]
    counts = np.bincount(key.ravel(), minlength=rows * bins).reshape(rows, 2, bits + 1)
    return counts.sum(1), counts[:, 1]


def _chunk_rows(bytes_per_pair: int, ndb: int, chunk_mb: float) -> int:
    return max(1, int(chunk_mb * 2**20 // (bytes_per_pair * ndb)))


def _run_chunks(fn, nq: int, rows: int) -> None:
    # single-threaded: a 2-thread pool did not measurably help on the busy 2-core box (README)
    for s in range(0, nq, rows):
        fn(s, min(s + rows, nq))


def distance_counts(
    query_codes, query_labels, db_codes, db_labels, *, chunk_mb: float = CHUNK_MB
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query, per-distance counts (n, r), each int64 (nq, K+1): all items / relevant items
    at Hamming distance d. Every tie-aware metric is a function of these two arrays."""
    query_codes, query_labels, db_codes, db_labels = _check_pair(query_codes, query_labels, db_codes, db_labels)
    bits, nq, ndb = 8 * db_codes.shape[1], len(query_codes), len(db_codes)
    q_words, db_words = _words(query_codes), _words(db_codes)
    relevance = _Relevance(query_labels, db_labels)
    n = np.empty((nq, bits + 1), np.int64)
    r = np.empty((nq, bits + 1), np.int64)

    def chunk(s: int, e: int) -> None:
        d = _block_distances(q_words[:, s:e], db_words, bits)
        n[s:e], r[s:e] = _count_block(d, relevance.block(s, e), bits)

    # per pair: the xor word, distance, relevance, key and bincount's own intp copy of the key
    _run_chunks(chunk, nq, _chunk_rows(8 + 1 + 1 + 2 + 8, ndb, chunk_mb))
    return n, r


# ---------------------------------------------------------------------------- tie-aware math


def _harmonic(n: int) -> np.ndarray:
    """H[0..n], H[0] = 0."""
    return np.concatenate(([0.0], np.cumsum(1.0 / np.arange(1, n + 1))))


def _group_terms(n, r, before, rel_before, m, harmonic):
    """Expected sum of precisions at the relevant items among the first m positions of tie
    groups (n items, r relevant) that start after `before` items, `rel_before` relevant."""
    n_safe = np.maximum(n, 1)
    alpha = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    c0 = rel_before + 1 - alpha * (before + 1)
    return (r / n_safe) * (c0 * (harmonic[before + m] - harmonic[before]) + alpha * m)


def _at_cutoffs(n, r, k):
    """Locate cut-offs k (nq, P), 1 <= k <= items, in the tie groups. Returns the flat index
    (into n.ravel()) of the group holding rank k, its size and relevant count, the items and
    relevant items ranked before it, and m, its positions <= k. One searchsorted finds all
    groups: each row's cumulative counts are offset past the previous row's."""
    nq, groups = n.shape
    cum, cum_r = np.cumsum(n, axis=1), np.cumsum(r, axis=1)
    stride = cum[:, -1].max() + 1
    offsets = np.arange(nq)[:, None] * stride
    flat = np.searchsorted((cum + offsets).ravel(), k + offsets)
    n_g, r_g = n.ravel()[flat], r.ravel()[flat]
    before, rel_before = cum.ravel()[flat] - n_g, cum_r.ravel()[flat] - r_g
    return flat, n_g, r_g, before, rel_before, k - before


def _hits(n_g, r_g, rel_before, m):
    return rel_before + r_g * m / np.maximum(n_g, 1)


def expected_hits(n: np.ndarray, r: np.ndarray, cutoffs) -> np.ndarray:
    """Expected number of relevant items in the top N, per query and cut-off: (nq, len)."""
    k = np.minimum(np.asarray(cutoffs, np.int64)[None, :], n.sum(1)[:, None])
    _, n_g, r_g, _, rel_before, m = _at_cutoffs(n, r, k)
    return _hits(n_g, r_g, rel_before, m)


def expected_average_precision(n: np.ndarray, r: np.ndarray, topk: int | None = None) -> np.ndarray:
    """Tie-aware AP per query from the (n, r) counts; topk=None = full ranking."""
    total = n.sum(1)
    harmonic = _harmonic(int(total.max()))
    before = np.cumsum(n, axis=1) - n
    rel_before = np.cumsum(r, axis=1) - r
    full = _group_terms(n, r, before, rel_before, n, harmonic)
    if topk is None:
        precision_sum, hits = full.sum(1), r.sum(1)
    else:
        flat, n_g, r_g, before_g, rel_before_g, m = _at_cutoffs(n, r, np.minimum(topk, total)[:, None])
        whole_groups = (np.cumsum(full, axis=1) - full).ravel()[flat[:, 0]]
        precision_sum = whole_groups + _group_terms(n_g, r_g, before_g, rel_before_g, m, harmonic)[:, 0]
        hits = _hits(n_g, r_g, rel_before_g, m)[:, 0]
    return np.divide(precision_sum, hits, out=np.zeros(len(n)), where=hits > 0)


# ---------------------------------------------------------------------------- stable ranking


def _stable_scan(query_codes, query_labels, db_codes, db_labels, ks, cutoffs, seed, chunk_mb):
    """Rank the seeded permutation of the database by stable sort, chunk by chunk.
    Returns counts (n, r), AP per query for each k in ks, and relevant hits at each cut-off."""
    bits, nq, ndb = 8 * db_codes.shape[1], len(query_codes), len(db_codes)
    perm = np.random.default_rng(seed).permutation(ndb)
    q_words, db_words = _words(query_codes), _words(db_codes[perm])
    relevance = _Relevance(query_labels, db_labels[perm])
    n = np.empty((nq, bits + 1), np.int64)
    r = np.empty((nq, bits + 1), np.int64)
    ap = np.empty((nq, len(ks)))
    hits = np.empty((nq, len(cutoffs)), np.int64)
    ranks = np.arange(1, ndb + 1)
    k_idx = np.minimum(np.asarray(ks, np.int64), ndb) - 1
    cut_idx = np.minimum(np.asarray(cutoffs, np.int64), ndb) - 1

    def chunk(s: int, e: int) -> None:
        d = _block_distances(q_words[:, s:e], db_words, bits)
        rel = relevance.block(s, e)
        n[s:e], r[s:e] = _count_block(d, rel, bits)
        ranked = np.take_along_axis(rel, np.argsort(d, axis=1, kind="stable"), axis=1)
        found = np.cumsum(ranked, axis=1)
        precision_sum = np.cumsum(np.where(ranked, found / ranks, 0.0), axis=1)
        found_k = found[:, k_idx]
        ap[s:e] = np.divide(precision_sum[:, k_idx], found_k, out=np.zeros(found_k.shape), where=found_k > 0)
        hits[s:e] = found[:, cut_idx]

    # per pair: distance, relevance, sort index, ranked flags, two cumulative sums, precisions
    _run_chunks(chunk, nq, _chunk_rows(1 + 1 + 8 + 1 + 8 + 8 + 8 + 16, ndb, chunk_mb))
    return n, r, ap, hits


# ---------------------------------------------------------------------------- entry points


def average_precision(
    query_codes,
    query_labels,
    db_codes,
    db_labels,
    *,
    topk: int | None = None,
    tie_policy: str = "expected",
    seed: int = 0,
    chunk_mb: float = CHUNK_MB,
) -> np.ndarray:
    """AP per query (float64, nq): the data behind mAP and a "which queries failed" view."""
    _check_policy(tie_policy)
    if topk is not None:
        (topk,) = _check_cutoffs("topk", topk)
    if tie_policy == "expected":
        n, r = distance_counts(query_codes, query_labels, db_codes, db_labels, chunk_mb=chunk_mb)
        return expected_average_precision(n, r, topk)
    args = _check_pair(query_codes, query_labels, db_codes, db_labels)
    k = len(args[2]) if topk is None else topk
    return _stable_scan(*args, (k,), (), seed, chunk_mb)[2][:, 0]


def pr_cutoffs(ndb: int, points: int = 64) -> np.ndarray:
    """About `points` cut-offs in 1..ndb: half log-spaced (the head), half linear (the tail)."""
    half = max(1, points // 2)
    cuts = np.concatenate((np.geomspace(1, ndb, half), np.linspace(ndb / half, ndb, half)))
    return np.unique(np.clip(np.rint(cuts).astype(np.int64), 1, ndb))


def retrieval_metrics(
    query_codes,
    query_labels,
    db_codes,
    db_labels,
    *,
    topk=(1000,),
    precision_at=(100, 1000),
    radius: int = 2,
    tie_policy: str = "expected",
    seed: int = 0,
    pr_points=64,
    chunk_mb: float = CHUNK_MB,
) -> dict:
    """All retrieval metrics as plain JSON-serialisable Python.

    Metric names are MLflow-safe: mAP, mAP_at_<k>, P_at_<N>, P_radius_<r>. Also: queries,
    database, bits, zero_relevant_queries, empty_radius_queries, tie_policy (and seed for
    "stable"), and the curves pr_radius {radius, precision, recall, empty_queries} and
    pr_at_n {n, precision, recall}. `pr_points` is a number of PR cut-offs (see `pr_cutoffs`)
    or an explicit list of them.
    """
    _check_policy(tie_policy)
    topk = _check_cutoffs("topk", topk)
    precision_at = _check_cutoffs("precision_at", precision_at)
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise UserError(f"radius must be a non-negative integer, got {radius!r}")
    query_codes, query_labels, db_codes, db_labels = _check_pair(query_codes, query_labels, db_codes, db_labels)
    nq, ndb, bits = len(query_codes), len(db_codes), 8 * db_codes.shape[1]
    if isinstance(pr_points, (int, np.integer)) and not isinstance(pr_points, bool):
        if pr_points <= 0:
            raise UserError(f"pr_points must be positive, got {pr_points}")
        pr_n = pr_cutoffs(ndb, int(pr_points))
    else:
        pr_n = np.unique(np.minimum(_check_cutoffs("pr_points", pr_points), ndb))
    cutoffs = np.concatenate((np.minimum(precision_at, ndb), pr_n)).astype(np.int64)

    if tie_policy == "expected":
        n, r = distance_counts(query_codes, query_labels, db_codes, db_labels, chunk_mb=chunk_mb)
        aps = np.stack([expected_average_precision(n, r, k) for k in (None, *topk)], axis=1)
        hits = expected_hits(n, r, cutoffs)
    else:
        ks = (ndb, *topk)
        n, r, aps, hits = _stable_scan(query_codes, query_labels, db_codes, db_labels, ks, cutoffs, seed, chunk_mb)

    relevant = r.sum(1)
    has_rel = relevant > 0
    within_n = np.cumsum(n, axis=1)
    within_r = np.cumsum(r, axis=1)
    radius_precision = np.divide(within_r, within_n, out=np.zeros(n.shape), where=within_n > 0)
    radius_recall = within_r[has_rel] / relevant[has_rel, None]
    at_n_precision = hits / cutoffs
    at_n_recall = hits[has_rel] / relevant[has_rel, None]
    rad = min(int(radius), bits)
    npa = len(precision_at)

    out = {"mAP": float(aps[:, 0].mean())}
    out.update({f"mAP_at_{k}": float(aps[:, i + 1].mean()) for i, k in enumerate(topk)})
    out.update({f"P_at_{p}": float(at_n_precision[:, i].mean()) for i, p in enumerate(precision_at)})
    out[f"P_radius_{radius}"] = float(radius_precision[:, rad].mean())
    out.update(
        queries=nq,
        database=ndb,
        bits=bits,
        zero_relevant_queries=int((~has_rel).sum()),
        empty_radius_queries=int((within_n[:, rad] == 0).sum()),
        tie_policy=tie_policy,
    )
    if tie_policy == "stable":
        out["seed"] = int(seed)
    out["pr_radius"] = {
        "radius": list(range(bits + 1)),
        "precision": radius_precision.mean(0).tolist(),
        "recall": radius_recall.mean(0).tolist() if has_rel.any() else [0.0] * (bits + 1),
        "empty_queries": (within_n == 0).sum(0).tolist(),
    }
    out["pr_at_n"] = {
        "n": pr_n.tolist(),
        "precision": at_n_precision[:, npa:].mean(0).tolist(),
        "recall": at_n_recall[:, npa:].mean(0).tolist() if has_rel.any() else [0.0] * len(pr_n),
    }
    return out


# ---------------------------------------------------------------------------- rerank


def reranked_average_precision(
    query_real, query_labels, db_codes, db_labels, *, rerank: int, topk=(1000,), chunk_mb: float = CHUNK_MB
) -> dict:
    """mAP and mAP@k when the top `rerank` items by Hamming distance are reordered by the
    asymmetric distance of the queries' real-valued codes (adalabelhash.codes.asymmetric_distances).

    Ranking: the head is the `rerank` items first by (Hamming distance, asymmetric distance),
    ordered by (asymmetric distance, Hamming distance, database index); the tail is the rest by
    Hamming distance with the tie-aware expectation over its tie groups, exactly as the
    headline metrics, so rerank is the only difference. AP@k divides by the (expected)
    relevant items in the top k, as `expected_average_precision` does.
    """
    from adalabelhash.codes import asymmetric_distances, pack_codes

    query_real = np.asarray(query_real, dtype=np.float32)
    topk = _check_cutoffs("topk", topk)
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
        raise UserError(f"rerank must be a positive integer, got {rerank!r}")
    query_codes, query_labels, db_codes, db_labels = _check_pair(pack_codes(query_real), query_labels, db_codes, db_labels)
    bits, nq, ndb = 8 * db_codes.shape[1], len(query_codes), len(db_codes)
    head_size = min(int(rerank), ndb)
    q_words, db_words = _words(query_codes), _words(db_codes)
    relevance = _Relevance(query_labels, db_labels)
    harmonic = _harmonic(ndb)
    ranks = np.arange(1, head_size + 1)
    ks = [min(k, ndb) for k in topk]
    aps = np.zeros((nq, 1 + len(ks)))

    def chunk(s: int, e: int) -> None:
        d = _block_distances(q_words[:, s:e], db_words, bits)
        rel = relevance.block(s, e)
        asym = asymmetric_distances(query_real[s:e], db_codes)
        key = d + asym.astype(np.float64) / (bits + 1)  # (Hamming, asymmetric) lexicographic: asym < bits + 1
        head = np.argpartition(key, head_size - 1, axis=1)[:, :head_size] if head_size < ndb else \
            np.broadcast_to(np.arange(ndb), (e - s, ndb))
        head_d, head_asym = np.take_along_axis(d, head, 1), np.take_along_axis(asym, head, 1)
        head = np.take_along_axis(head, np.lexsort((head, head_d, head_asym), axis=1), 1)
        head_d, head_rel = np.take_along_axis(d, head, 1), np.take_along_axis(rel, head, 1)
        found = np.cumsum(head_rel, axis=1)
        precision_sum = np.cumsum(np.where(head_rel, found / ranks, 0.0), axis=1)
        n, r = _count_block(d, rel, bits)
        n_head, r_head = _count_block(head_d, head_rel, bits)
        n_tail, r_tail = n - n_head, r - r_head
        before = head_size + np.cumsum(n_tail, axis=1) - n_tail
        rel_before = found[:, -1:] + np.cumsum(r_tail, axis=1) - r_tail
        tail_terms = _group_terms(n_tail, r_tail, before, rel_before, n_tail, harmonic)
        relevant = r.sum(1)
        total = precision_sum[:, -1] + tail_terms.sum(1)
        aps[s:e, 0] = np.divide(total, relevant, out=np.zeros(e - s), where=relevant > 0)
        for i, k in enumerate(ks, 1):
            if k <= head_size:
                summed, hits = precision_sum[:, k - 1], found[:, k - 1].astype(float)
            else:  # the head, then the tail's positions up to k - head_size
                flat, n_g, r_g, b_g, rb_g, m = _at_cutoffs(n_tail, r_tail, np.full((e - s, 1), k - head_size))
                whole = (np.cumsum(tail_terms, axis=1) - tail_terms).ravel()[flat[:, 0]]
                part = _group_terms(n_g, r_g, b_g + head_size, rb_g + found[:, -1:], m, harmonic)[:, 0]
                summed = precision_sum[:, -1] + whole + part
                hits = found[:, -1] + _hits(n_g, r_g, rb_g, m)[:, 0]
            aps[s:e, i] = np.divide(summed, hits, out=np.zeros(e - s), where=hits > 0)

    # per pair: distance, relevance, asymmetric (float32) and key (float64), partition index, head copies
    _run_chunks(chunk, nq, _chunk_rows(1 + 1 + 4 + 8 + 8 + 24, ndb, chunk_mb))
    out = {"mAP": float(aps[:, 0].mean())}
    out.update({f"mAP_at_{k}": float(aps[:, i + 1].mean()) for i, k in enumerate(topk)})
    return out


# ---------------------------------------------------------------------------- codewords


def codeword_distance_matrix(codewords_bits) -> np.ndarray:
    """C × C int64 Hamming distances between binarised codewords ({0, 1} bits, (C, K))."""
    bits = np.asarray(codewords_bits)
    if bits.ndim != 2 or bits.size == 0:
        raise UserError(f"codewords must be a non-empty 2-D bit array (classes, bits), got shape {bits.shape}")
    if not np.isin(bits, (0, 1)).all():
        raise UserError("codewords must be {0, 1} bits: binarise them first (adalabelhash.codes.binarize)")
    ones = bits.astype(np.int64)
    return ones @ (1 - ones).T + (1 - ones) @ ones.T


def nearest_class_pairs(dist, class_names, k: int) -> list[tuple[str, str, int]]:
    """The k closest unordered class pairs (a, b, distance), a < b by name, sorted by
    (distance, a, b) so that equal distances come out in a fixed order."""
    dist = np.asarray(dist)
    names = [str(c) for c in class_names]
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1] or dist.shape[0] != len(names):
        raise UserError(f"distance matrix {dist.shape} does not match {len(names)} class names")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise UserError(f"k must be a non-negative integer, got {k!r}")
    i, j = np.triu_indices(len(names), 1)
    pairs = [(*sorted((names[a], names[b])), int(dist[a, b])) for a, b in zip(i, j)]
    pairs.sort(key=lambda p: (p[2], p[0], p[1]))
    return pairs[:k]


def _codeword_distance_blocks(codes_packed, codewords_packed):
    """(start, distances (rows, C)) blocks of image-to-codeword Hamming distances."""
    codes_packed = _check_codes("codes", codes_packed)
    codewords_packed = _check_codes("codewords", codewords_packed)
    if codes_packed.shape[1] != codewords_packed.shape[1]:
        raise UserError(
            f"code widths differ: codes have {8 * codes_packed.shape[1]} bits, "
            f"codewords {8 * codewords_packed.shape[1]}"
        )
    words = _words(codewords_packed)
    bits = 8 * codes_packed.shape[1]
    code_words = _words(codes_packed)
    rows = _chunk_rows(8 + 1, len(codewords_packed), CHUNK_MB)
    for s in range(0, len(codes_packed), rows):
        yield s, _block_distances(code_words[:, s : s + rows], words, bits)


def nearest_codeword_classify(codes_packed, codewords_packed) -> np.ndarray:
    """Predicted class per image: argmin Hamming distance to the packed codewords; ties go to
    the lowest class index (np.argmin), so the result is deterministic."""
    return np.concatenate([d.argmin(1) for _, d in _codeword_distance_blocks(codes_packed, codewords_packed)])


def own_codeword_distance(codes_packed, codewords_packed, labels) -> np.ndarray:
    """Per image, the Hamming distance to its own class's codeword (multi-label: the nearest of
    its classes' codewords): how far the codes sit from the label space they were trained on."""
    codes_packed, codewords_packed = _check_codes("codes", codes_packed), _check_codes("codewords", codewords_packed)
    labels = _check_labels("labels", labels, len(codes_packed))
    if labels.shape[1] != len(codewords_packed):
        raise UserError(f"labels have {labels.shape[1]} classes but there are {len(codewords_packed)} codewords")
    if not labels.any(1).all():
        raise UserError("every image needs at least one label to have an own codeword")
    blocks = _codeword_distance_blocks(codes_packed, codewords_packed)
    return np.concatenate([np.where(labels[s : s + len(d)], d, np.iinfo(d.dtype).max).min(1)
                           for s, d in blocks]).astype(np.int64)


def class_code_spread(codes_packed, labels) -> dict[str, float]:
    """Mean Hamming distance between two codes of the same class (`within`, averaged over classes
    with >= 2 images) and of two different classes (`across`, averaged over class pairs).

    Exact, from per-class counts of ones per bit: two codes drawn from classes c and d differ in
    bit k with probability p_ck (1 - p_dk) + (1 - p_ck) p_dk (without replacement when c = d).
    Retrieval ranks by these distances, so `within` is the spread that costs mAP."""
    codes_packed = _check_codes("codes", codes_packed)
    labels = _check_labels("labels", labels, codes_packed.shape[0]).astype(np.float64)
    ones = np.zeros((labels.shape[1], 8 * codes_packed.shape[1]))
    for s in range(0, len(codes_packed), 65536):
        ones += labels[s : s + 65536].T @ np.unpackbits(codes_packed[s : s + 65536], axis=1)
    n = labels.sum(0)
    zeros = n[:, None] - ones
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_distance = (ones @ zeros.T + zeros @ ones.T) / np.outer(n, n)
        within = np.diag(mean_distance) * n / (n - 1)
    classes = np.flatnonzero(n >= 2)
    i, j = np.triu_indices(len(n), 1)
    pairs = (n[i] > 0) & (n[j] > 0)
    if not len(classes) or not pairs.any():
        raise UserError("class spread needs a class with >= 2 images and two classes with images")
    return {"within": float(within[classes].mean()), "across": float(mean_distance[i[pairs], j[pairs]].mean())}
