"""Retrieval metrics: hand-computed rankings with ties, slow references, PR curves, validation."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from adalabelhash.codes import pack_bits
from adalabelhash.errors import UserError
from adalabelhash.metrics import (
    average_precision,
    class_code_spread,
    codeword_distance_matrix,
    distance_counts,
    expected_average_precision,
    expected_hits,
    hamming_distances,
    nearest_class_pairs,
    nearest_codeword_classify,
    own_codeword_distance,
    retrieval_metrics,
)


def codes(*values: int) -> np.ndarray:
    """8-bit codes from ints: bit j of the code is bit 7 - j of the int (np.packbits order)."""
    return np.array(values, dtype=np.uint8)[:, None]


def one_hot(classes, width: int = 3) -> np.ndarray:
    return np.eye(width, dtype=np.int64)[list(classes)]


def flat(result: dict, drop=("tie_policy", "seed")) -> dict:
    """Nested result -> {dotted key: number}, for pytest.approx (which does not nest)."""
    out = {}
    for key, value in result.items():
        if key in drop:
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}.{i}": v for k, values in value.items() for i, v in enumerate(values)})
        else:
            out[key] = value
    return out


# Golden case: query 0b00000000 against 4 items
#   A 0b00000001 d=1 relevant | B 0b00000011 d=2 relevant | C 0b00000101 d=2 not | D 0b00000111 d=3 not
# B and C tie. Order A,B,C,D: precisions at relevant 1/1, 2/2 -> AP 1
#              Order A,C,B,D: precisions at relevant 1/1, 2/3 -> AP 5/6
# expected AP = (1 + 5/6) / 2 = 11/12
Q = codes(0b0)
DB = codes(0b1, 0b11, 0b101, 0b111)
QL = one_hot([0])
DBL = one_hot([0, 0, 1, 2])


def test_golden_tie_aware_ap_is_the_average_over_tie_orders():
    assert average_precision(Q, QL, DB, DBL)[0] == pytest.approx(11 / 12)
    # top 3: sums of precisions 2 (ABC) and 1 + 2/3 (ACB), 2 hits both ways -> (11/6) / 2
    assert average_precision(Q, QL, DB, DBL, topk=3)[0] == pytest.approx(11 / 12)
    # top 2: sums 2 (AB) and 1 (AC), hits 2 and 1 -> E[sum] / E[hits] = 1.5 / 1.5
    assert average_precision(Q, QL, DB, DBL, topk=2)[0] == pytest.approx(1.0)
    # top 1: A alone
    assert average_precision(Q, QL, DB, DBL, topk=1)[0] == pytest.approx(1.0)


def test_golden_ap_at_k_is_a_ratio_of_expectations():
    # A d=1 not relevant, B d=2 relevant, C d=2 not relevant; top 2 is A,B or A,C:
    #   A,B: 1 hit, precision sum 1/2;  A,C: 0 hits, sum 0
    # ratio of expectations (1/4) / (1/2) = 1/2 (the expectation of the ratio would be 1/4)
    ap = average_precision(Q, QL, codes(0b1, 0b11, 0b101), one_hot([1, 0, 2]), topk=2)
    assert ap[0] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(6))
def test_golden_stable_policy_follows_the_seeded_permutation(seed):
    # B (index 1) and C (index 2) tie; the stable sort keeps their order in the permuted database
    perm = list(np.random.default_rng(seed).permutation(4))
    expected = 1.0 if perm.index(1) < perm.index(2) else 5 / 6
    assert average_precision(Q, QL, DB, DBL, tie_policy="stable", seed=seed)[0] == pytest.approx(expected)
    result = retrieval_metrics(Q, QL, DB, DBL, topk=(3,), tie_policy="stable", seed=seed)
    assert result["mAP"] == pytest.approx(expected)
    assert result["seed"] == seed and result["tie_policy"] == "stable"


def test_stable_full_ranking_keeps_the_last_item():
    # the only relevant item is ranked last: AP = 1/4 (the peer's topk=-1 would drop it and say 0)
    ap = average_precision(Q, QL, DB, one_hot([1, 1, 1, 0]), tie_policy="stable")
    assert ap[0] == pytest.approx(1 / 4)


def test_golden_precision_at_n_and_radius():
    out = retrieval_metrics(Q, QL, DB, DBL, topk=(2,), precision_at=(1, 2, 3, 4, 10), radius=2, pr_points=[1, 2, 3, 4])
    # expected hits in the top N: 1, 1 + 1/2, 2, 2 (N = 10 is clipped to the 4 items)
    assert [out[f"P_at_{n}"] for n in (1, 2, 3, 4, 10)] == pytest.approx([1, 0.75, 2 / 3, 0.5, 0.5])
    assert out["P_radius_2"] == pytest.approx(2 / 3)  # within d <= 2: A, B, C
    assert out["pr_at_n"]["recall"] == pytest.approx([0.5, 0.75, 1, 1])
    assert out["pr_radius"]["precision"] == pytest.approx([0, 1, 2 / 3, 0.5] + [0.5] * 5)
    assert out["pr_radius"]["recall"] == pytest.approx([0, 0.5, 1, 1] + [1] * 5)
    assert out["pr_radius"]["empty_queries"] == [1] + [0] * 8  # nothing at distance 0
    assert (out["queries"], out["database"], out["bits"]) == (1, 4, 8)


def test_empty_radius_queries_score_zero_and_are_counted():
    # query 2 is 0b11110000: the nearest item (A) is 5 bits away, nothing within radius 1
    out = retrieval_metrics(codes(0b0, 0b1, 0b11110000), one_hot([0, 0, 0]), DB, DBL, radius=1)
    # query 0: within 1 = {A} -> 1;  query 1 (0b1): within 1 = {A, B, C} -> 2/3;  query 2: 0
    assert out["P_radius_1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert out["empty_radius_queries"] == 1


def test_zero_relevant_queries_count_as_zero():
    out = retrieval_metrics(codes(0b0, 0b0), one_hot([0, 1]), DB[:2], one_hot([0, 0]), topk=(1,))
    assert out["zero_relevant_queries"] == 1
    assert out["mAP"] == pytest.approx(0.5)  # query 0 has AP 1, query 1 has no relevant item: 0
    assert out["mAP_at_1"] == pytest.approx(0.5)
    # recall is averaged only over queries with relevant items
    assert out["pr_at_n"]["recall"][-1] == pytest.approx(1.0)
    assert out["pr_radius"]["recall"][-1] == pytest.approx(1.0)


def test_multi_label_relevance_is_any_shared_label():
    # query has labels {0, 1}; items: {0} d=1, {1} d=2, {2} d=2, {0, 2} d=3 -> relevant, relevant, not, relevant
    ql = np.array([[1, 1, 0]])
    dbl = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=bool)
    # orders A,B,C,D: 1, 1, 3/4 -> 11/12;  A,C,B,D: 1, 2/3, 3/4 -> 29/36;  mean over R = 3
    expected = ((1 + 1 + 3 / 4) + (1 + 2 / 3 + 3 / 4)) / 2 / 3
    assert average_precision(Q, ql, DB, dbl)[0] == pytest.approx(expected)


# ---------------------------------------------------------------------------- slow references


def tie_orders(dist_row):
    """Every ranking consistent with the distances: all permutations inside each tie group."""
    groups = [np.flatnonzero(dist_row == d).tolist() for d in np.unique(dist_row)]
    for parts in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield [i for part in parts for i in part]


def precision_sum_and_hits(rel_ranked, k):
    hits, total = 0, 0.0
    for rank, rel in enumerate(rel_ranked[:k], 1):
        if rel:
            hits += 1
            total += hits / rank
    return total, hits


def reference_expected(dist, rel, k, cutoffs):
    """Exact expectations by enumerating tie orders: AP@k = E[sum] / E[hits], and E[hits at N]."""
    aps, hits_at = [], []
    for q in range(len(dist)):
        sums, hits, at = [], [], []
        for order in tie_orders(dist[q]):
            ranked = rel[q][order]
            s, h = precision_sum_and_hits(ranked, k)
            sums.append(s)
            hits.append(h)
            at.append([ranked[:c].sum() for c in cutoffs])
        aps.append(np.mean(sums) / np.mean(hits) if np.mean(hits) > 0 else 0.0)
        hits_at.append(np.mean(at, axis=0))
    return np.array(aps), np.array(hits_at)


def reference_group_formula(dist, rel):
    """Full-ranking AP straight from the per-tie-group sum over positions (no harmonic numbers)."""
    aps = []
    for q in range(len(dist)):
        total, before, rel_before = 0.0, 0, 0
        for d in np.unique(dist[q]):
            n, r = int((dist[q] == d).sum()), int(rel[q][dist[q] == d].sum())
            frac = (r - 1) / (n - 1) if n > 1 else 0.0
            total += sum(r / n * (rel_before + 1 + (j - 1) * frac) / (before + j) for j in range(1, n + 1))
            before, rel_before = before + n, rel_before + r
        aps.append(total / rel_before if rel_before else 0.0)
    return np.array(aps)


def reference_stable(dist, rel, k, seed):
    """The peer's CalcTopMap loop on the seeded permutation, ranked by Python's stable sort."""
    perm = np.random.default_rng(seed).permutation(dist.shape[1])
    aps = []
    for q in range(len(dist)):
        d, g = dist[q][perm], rel[q][perm]
        order = sorted(range(len(d)), key=lambda i: d[i])
        tgnd = g[order][:k]
        tsum = int(tgnd.sum())
        if tsum == 0:
            aps.append(0.0)
            continue
        count = np.linspace(1, tsum, tsum)
        tindex = np.flatnonzero(tgnd) + 1.0
        aps.append(np.mean(count / tindex))
    return np.array(aps)


def tie_heavy_data(seed, nq, ndb, bits, multi, classes=3):
    """Codes that differ from one base code in a few positions spread over all words, so that
    distances are small and ties are everywhere; labels one-hot or multi-hot (possibly empty)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2, bits)
    positions = rng.choice(bits, size=min(5, bits), replace=False)

    def make(n):
        b = np.tile(base, (n, 1))
        b[:, positions] ^= rng.integers(0, 2, (n, len(positions)))
        labels = rng.random((n, classes)) < 0.4 if multi else np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, n)]
        return b, pack_bits(b), labels

    qb, qc, ql = make(nq)
    db, dc, dl = make(ndb)
    dist = (qb[:, None, :] != db[None, :, :]).sum(2)
    rel = (ql.astype(int) @ dl.astype(int).T) > 0
    return qc, ql, dc, dl, dist, rel


CASES = [(seed, bits, multi) for seed, (bits, multi) in enumerate(itertools.product((8, 16, 64, 72), (False, True)))]


@pytest.mark.parametrize("seed,bits,multi", CASES)
def test_tie_aware_matches_enumeration_of_tie_orders(seed, bits, multi):
    qc, ql, dc, dl, dist, rel = tie_heavy_data(seed, nq=3, ndb=7, bits=bits, multi=multi)
    assert (hamming_distances(qc, dc) == dist).all()
    n, r = distance_counts(qc, ql, dc, dl)
    cutoffs = [1, 2, 4, 7]
    for k in (1, 3, 7):
        ref_ap, ref_hits = reference_expected(dist, rel, k, cutoffs)
        np.testing.assert_allclose(expected_average_precision(n, r, k), ref_ap, atol=1e-12)
    np.testing.assert_allclose(expected_average_precision(n, r), reference_expected(dist, rel, 7, [])[0], atol=1e-12)
    np.testing.assert_allclose(expected_hits(n, r, cutoffs), ref_hits, atol=1e-12)


@pytest.mark.parametrize("seed,bits,multi", CASES)
def test_fast_paths_match_references_on_larger_inputs(seed, bits, multi):
    qc, ql, dc, dl, dist, rel = tie_heavy_data(100 + seed, nq=20, ndb=300, bits=bits, multi=multi)
    # a tiny chunk budget forces one query per chunk: chunking must not change anything
    np.testing.assert_allclose(
        average_precision(qc, ql, dc, dl, chunk_mb=0.001), reference_group_formula(dist, rel), atol=1e-12
    )
    for topk in (None, 50):
        k = 300 if topk is None else topk
        np.testing.assert_allclose(
            average_precision(qc, ql, dc, dl, topk=topk, tie_policy="stable", seed=seed, chunk_mb=0.001),
            reference_stable(dist, rel, k, seed),
            atol=1e-12,
        )


def test_tie_aware_metrics_do_not_depend_on_database_order():
    qc, ql, dc, dl, _, _ = tie_heavy_data(7, nq=10, ndb=200, bits=64, multi=False)
    perm = np.random.default_rng(1).permutation(200)
    a = retrieval_metrics(qc, ql, dc, dl, topk=(20,), precision_at=(20,))
    b = retrieval_metrics(qc, ql, dc[perm], dl[perm], topk=(20,), precision_at=(20,))
    assert flat(a) == pytest.approx(flat(b))


def test_distance_counts_are_histograms():
    qc, _, dc, _, dist, _ = tie_heavy_data(3, nq=5, ndb=50, bits=72, multi=True)
    # 70 classes: the labels span two uint64 words, and labels 64..69 must count too
    rng = np.random.default_rng(3)
    ql, dl = rng.random((5, 70)) < 0.03, rng.random((50, 70)) < 0.03
    ql[:, 64:], dl[:, 64:] = rng.random((5, 6)) < 0.5, rng.random((50, 6)) < 0.5
    rel = (ql.astype(int) @ dl.astype(int).T) > 0
    n, r = distance_counts(qc, ql, dc, dl)
    for q in range(5):
        assert n[q].tolist() == np.bincount(dist[q], minlength=73).tolist()
        assert r[q].tolist() == np.bincount(dist[q][rel[q]], minlength=73).tolist()


# ---------------------------------------------------------------------------- result dict, PR curves


@pytest.mark.parametrize("tie_policy", ["expected", "stable"])
def test_result_is_json_with_mlflow_names_and_monotone_recall(tie_policy):
    rng = np.random.default_rng(0)
    q_bits, db_bits = rng.integers(0, 2, (30, 16)), rng.integers(0, 2, (400, 16))
    ql, dl = one_hot(rng.integers(0, 3, 30)), one_hot(rng.integers(0, 3, 400))
    out = retrieval_metrics(pack_bits(q_bits), ql, pack_bits(db_bits), dl, topk=(10, 100), precision_at=(5, 50), tie_policy=tie_policy)
    assert json.loads(json.dumps(out)) == out
    for key, value in out.items():
        if isinstance(value, float):
            assert re.fullmatch(r"[\w\-. /]+", key), key
    assert {"mAP", "mAP_at_10", "mAP_at_100", "P_at_5", "P_at_50", "P_radius_2"} <= set(out)
    curve = out["pr_at_n"]
    assert curve["n"] == sorted(set(curve["n"])) and curve["n"][0] == 1 and curve["n"][-1] == 400
    assert 20 <= len(curve["n"]) <= 64
    assert np.all(np.diff(curve["recall"]) >= -1e-12) and curve["recall"][-1] == pytest.approx(1.0)
    assert curve["precision"][-1] == pytest.approx(np.mean(ql @ dl.T > 0))
    assert np.all(np.diff(out["pr_radius"]["recall"]) >= -1e-12) and out["pr_radius"]["recall"][-1] == pytest.approx(1.0)
    assert out["pr_radius"]["radius"] == list(range(17))


def test_policies_agree_without_ties():
    # 8 items at distinct distances 1..8 from the query: no ties, so both policies give the same ranking
    db = codes(*[(1 << j) - 1 << (8 - j) & 0xFF for j in range(1, 9)])
    dl = one_hot([0, 1, 0, 0, 1, 1, 0, 1])
    for topk in (3, 8):
        a = retrieval_metrics(Q, QL, db, dl, topk=(topk,), precision_at=(3,))
        b = retrieval_metrics(Q, QL, db, dl, topk=(topk,), precision_at=(3,), tie_policy="stable")
        assert flat(a) == pytest.approx(flat(b))


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(query_codes=np.zeros((1, 2), np.uint8)), "code widths differ"),
        (lambda a: a.update(query_labels=one_hot([0], width=4)), "label widths differ"),
        (lambda a: a.update(db_labels=DBL[:3]), "database labels has 3 rows but its codes have 4"),
        (lambda a: a.update(query_codes=np.zeros((0, 1), np.uint8), query_labels=np.zeros((0, 3))), "non-empty"),
        (lambda a: a.update(db_codes=DB.astype(np.int64)), "packed uint8"),
        (lambda a: a.update(query_labels=np.array([[2, 0, 0]])), "0/1"),
        (lambda a: a.update(tie_policy="optimistic"), "unknown tie_policy"),
        (lambda a: a.update(topk=(0,)), "topk values must be positive"),
        (lambda a: a.update(precision_at=(-5,)), "precision_at values must be positive"),
        (lambda a: a.update(radius=-1), "radius"),
    ],
)
def test_bad_input_raises_one_clear_user_error(change, message):
    args = dict(query_codes=Q, query_labels=QL, db_codes=DB, db_labels=DBL)
    change(args)
    kwargs = {k: args.pop(k) for k in ("tie_policy", "topk", "precision_at", "radius") if k in args}
    with pytest.raises(UserError, match=message):
        retrieval_metrics(args["query_codes"], args["query_labels"], args["db_codes"], args["db_labels"], **kwargs)


# ---------------------------------------------------------------------------- codewords


def test_codeword_distances_pairs_and_classification():
    bits = np.array([[0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    dist = codeword_distance_matrix(bits)
    assert dist.tolist() == [[0, 2, 2, 8], [2, 0, 4, 6], [2, 4, 0, 6], [8, 6, 6, 0]]
    # names out of index order: pair (0, 1) is (cat, dog) but (ant, cat) = (0, 2) wins the tie at 2 by name;
    # likewise (ant, bee) = (2, 3) before (bee, dog) = (1, 3) at 6
    assert nearest_class_pairs(dist, ["cat", "dog", "ant", "bee"], 5) == [
        ("ant", "cat", 2),
        ("cat", "dog", 2),
        ("ant", "dog", 4),
        ("ant", "bee", 6),
        ("bee", "dog", 6),
    ]
    assert len(nearest_class_pairs(dist, ["a", "b", "c", "d"], 100)) == 6
    images = pack_bits(np.array([[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]))
    # image 0: d = 1, 1, 3, 7 -> tie between classes 0 and 1 -> lowest index 0
    # image 1: d = 3, 1, 3, 5 -> 1;  image 2: d = 6, 4, 4, 2 -> 3
    assert nearest_codeword_classify(images, pack_bits(bits)).tolist() == [0, 1, 3]
    with pytest.raises(UserError, match="binarise"):
        codeword_distance_matrix(np.array([[0.3, -0.2]]))
    with pytest.raises(UserError, match="does not match"):
        nearest_class_pairs(dist, ["a", "b"], 1)


def test_own_codeword_distance_takes_the_nearest_own_class():
    cw = pack_bits(np.array([[0] * 8, [1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]))
    images = codes(0b10000000, 0b11111110, 0b11110001)
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1]])
    # image 1 is 7 bits from its own codeword (class 0) though 1 bit from class 1's; image 2 has
    # classes 1 and 2: 3 and 1 bits away -> 1
    assert own_codeword_distance(images, cw, labels).tolist() == [1, 7, 1]
    with pytest.raises(UserError, match="at least one label"):
        own_codeword_distance(images, cw, np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0]]))
    with pytest.raises(UserError, match="3 codewords"):
        own_codeword_distance(images, cw, labels[:, :2])


def test_class_code_spread_matches_brute_force_pairs():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, (60, 24))
    labels = (rng.random((60, 4)) < 0.4).astype(int)
    labels[:, 3] = 0
    labels[0, 3] = 1  # a class with one image: no within pair, but it has across pairs
    packed = pack_bits(bits)
    spread = class_code_spread(packed, labels)
    dist = (bits[:, None] != bits[None]).sum(2)
    within = [dist[np.ix_(m, m)][~np.eye(m.sum(), dtype=bool)].mean() for m in labels[:, :3].T.astype(bool)]
    across = [dist[np.ix_(labels[:, c] > 0, labels[:, d] > 0)].mean() for c, d in itertools.combinations(range(4), 2)]
    assert spread == pytest.approx({"within": np.mean(within), "across": np.mean(across)})
    tight = pack_bits(np.repeat(np.eye(2, 16, dtype=int), 5, axis=0))  # two classes, identical codes inside each
    assert class_code_spread(tight, np.repeat(np.eye(2, dtype=int), 5, axis=0)) == {"within": 0.0, "across": 2.0}
    with pytest.raises(UserError, match=">= 2 images"):
        class_code_spread(packed[:1], labels[:1])


def _explicit_ap(ranked_rel, k=None):
    ranked_rel = ranked_rel[:k] if k else ranked_rel
    found = np.cumsum(ranked_rel)
    return (np.where(ranked_rel, found / np.arange(1, len(ranked_rel) + 1), 0).sum() / found[-1]) if found[-1] else 0.0


def test_reranked_ap_matches_explicit_rankings_averaged_over_tail_tie_orders():
    from adalabelhash.codes import asymmetric_distances, pack_codes
    from adalabelhash.metrics import reranked_average_precision

    rng = np.random.default_rng(3)
    real = np.tanh(rng.normal(size=(4, 8)) * 2).astype(np.float32)
    db_codes = rng.integers(0, 256, (40, 1), dtype=np.uint8)  # 8 bits, 40 items: ties in every group
    q_labels = np.eye(3, dtype=np.uint8)[rng.integers(0, 3, 4)]
    db_labels = np.eye(3, dtype=np.uint8)[rng.integers(0, 3, 40)]
    head = 12
    got = reranked_average_precision(real, q_labels, db_codes, db_labels, rerank=head, topk=(5, 20))
    d = hamming_distances(pack_codes(real), db_codes)
    asym = asymmetric_distances(real, db_codes)
    aps = np.zeros((4, 3))
    shuffles = 3000
    for q in range(4):
        rel = (db_labels @ q_labels[q]) > 0
        chosen = np.lexsort((np.arange(40), asym[q], d[q]))[:head]  # first by (Hamming, asymmetric)
        chosen = chosen[np.lexsort((chosen, d[q][chosen], asym[q][chosen]))]
        rest = np.setdiff1d(np.arange(40), chosen)
        for _ in range(shuffles):  # the tail in random tie orders: the expectation, by sampling
            tail = rest[np.lexsort((rng.random(len(rest)), d[q][rest]))]
            ranked = rel[np.concatenate((chosen, tail))]
            aps[q] += [_explicit_ap(ranked), _explicit_ap(ranked, 5), _explicit_ap(ranked, 20)]
    aps /= shuffles
    assert got["mAP"] == pytest.approx(aps[:, 0].mean(), abs=0.01)
    assert got["mAP_at_5"] == pytest.approx(aps[:, 1].mean(), abs=1e-9)  # inside the head: exact
    # beyond the head mAP@k is a ratio of expectations (as the headline mAP@k), close to the sampled mean
    assert got["mAP_at_20"] == pytest.approx(aps[:, 2].mean(), abs=0.03)
    whole = reranked_average_precision(real, q_labels, db_codes, db_labels, rerank=40, topk=(40,))
    explicit = [_explicit_ap(((db_labels @ q_labels[q]) > 0)[np.lexsort((np.arange(40), d[q], asym[q]))]) for q in range(4)]
    assert whole["mAP"] == pytest.approx(np.mean(explicit), abs=1e-12) == pytest.approx(whole["mAP_at_40"], abs=1e-12)
