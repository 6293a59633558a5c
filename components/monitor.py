"""Step `monitor`: has the data drifted from the champion's, and does the champion still fit it?

A profile (profile.parquet) holds one row per sampled image: its class, image statistics and,
given an ONNX encoder, its real-valued (tanh) code. The champion's profile of its own data is
the reference; the step profiles the new dataset version with the same encoder and compares:

- data: class counts over the whole manifests (chi-square) and image statistics per class
  (two-sample Kolmogorov-Smirnov), Holm-corrected as one family of tests, each flag also
  needing an effect size above a floor, so a large sample does not flag a trivial shift;
- codes (no labels needed): bit balance (per-bit share of ones, chi-square per bit), near-zero
  outputs, distinct codes, the largest bucket, the Hamming distance to the nearest codeword
  (Kolmogorov-Smirnov) and the nearest-codeword class histogram (chi-square);
- quality: the champion's mAP on the new queries against its recorded mAP (the caller scores it).

Outputs drift.json (`retrain` + the reasons) and a self-contained report.html. Thresholds:
params.yaml `monitor:`. Statistics come from scipy.stats (README, "Monitoring", says why).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adalabelhash.errors import UserError

PROFILE_NAME = "profile.parquet"
DRIFT_NAME = "drift.json"
REPORT_NAME = "report.html"
# Per-image statistics: what a camera, a scanner or a pre-processing change moves.
IMAGE_STATS = ("width", "height", "brightness", "contrast", "mean_red", "mean_green", "mean_blue", "sharpness")
PROFILE_COLUMNS = ("id", "path", "split", "class", "labels", "class_images", *IMAGE_STATS)
# Images larger than this are measured on a thumbnail: bounded cost, same scale in both versions.
STATS_MAX_SIDE = 512
NEAR_ZERO = 0.1  # |tanh| below this: the encoder does not commit to the bit
UNLABELLED = "(no label)"
FLAGGED_SHOWN = 40  # flagged per-class tests listed in the report (all of them: drift.json)


@dataclass(frozen=True)
class MonitorParams:
    """params.yaml `monitor:` (documented there)."""

    sample_per_class: int = 200  # images profiled per class, all splits: bounded cost on big datasets
    seed: int = 0  # which images are sampled (a hash of seed and path: the same image in both versions)
    alpha: float = 0.01  # family-wise significance level of the data tests, and of the code tests (Holm)
    min_ks: float = 0.2  # KS statistic (largest CDF gap) an image statistic or code distance must shift by
    min_share_shift: float = 0.05  # change of a class's (or nearest codeword's) share that counts
    min_bit_shift: float = 0.15  # change of a bit's share of ones that counts
    max_near_zero_increase: float = 0.05  # rise of the share of |tanh| < 0.1 outputs tolerated
    max_bucket_increase: float = 0.10  # rise of the largest bucket's share (codes collapsing) tolerated
    max_map_drop: float = 0.02  # champion's mAP on the new queries below its recorded mAP by more: retrain
    retrain_on_new_data: bool = True  # a new dataset version is reason enough to retrain (false: only drift is)
    batch_size: int = 128  # images per encoder call
    decode_threads: int = 4

    def __post_init__(self):
        if self.sample_per_class < 2 or self.batch_size < 1 or self.decode_threads < 1:
            raise ValueError("sample_per_class must be >= 2, batch_size and decode_threads >= 1")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        for name in ("min_ks", "min_share_shift", "min_bit_shift", "max_near_zero_increase", "max_bucket_increase"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_map_drop < 0:
            raise ValueError(f"max_map_drop must be >= 0, got {self.max_map_drop}")


# --- profile ---------------------------------------------------------------------------------

def profile(params: MonitorParams, manifest_path: str | Path, data_root: str | Path | None = None,
            onnx_path: str | Path | None = None) -> pd.DataFrame:
    """One row per sampled image (up to `sample_per_class` per primary class, all splits).

    Columns: PROFILE_COLUMNS (`class_images`: the class's image count in the whole manifest, so
    class shares are tested on all images, not on the capped sample), and given `onnx_path`,
    the encoder's tanh outputs code_0..code_{K-1}.
    """
    from adalabelhash.data.manifest import SPLITS, Manifest
    from adalabelhash.data.paths import require_directory

    manifest = Manifest.load(manifest_path)
    root = data_root if data_root is not None else manifest.info.get("root")
    if not root:
        raise UserError(f"{manifest_path}: no data root recorded (pass --data-root)")
    require_directory(root, "data root", " (pass --data-root)")
    if not len(manifest):
        raise UserError(f"{manifest_path}: the manifest has no images to profile")
    frame = manifest.frame
    labels = manifest.label_matrix()
    names = np.array([*manifest.classes, UNLABELLED], dtype=object)
    primary = names[np.where(labels.any(axis=1), labels.argmax(axis=1), len(manifest.classes))]
    ids = sample_ids(frame["path"], primary, params.sample_per_class, params.seed)
    mask = np.zeros(len(frame), dtype=bool)
    mask[ids] = True
    files = manifest.files(root, mask)
    flags = frame.loc[ids, list(SPLITS)].to_numpy()
    counts = pd.Series(primary).value_counts()
    rows = pd.DataFrame({
        "id": ids,
        "path": frame["path"].to_numpy()[ids],
        "split": ["+".join(s for s, on in zip(SPLITS, row) if on) for row in flags],
        "class": primary[ids].astype(str),
        "labels": frame["labels"].to_numpy()[ids],
        "class_images": counts.reindex(primary[ids]).to_numpy(dtype=np.int64),
    })
    with ThreadPoolExecutor(params.decode_threads) as pool:
        stats = pd.DataFrame(list(pool.map(image_statistics, files)), columns=list(IMAGE_STATS))
    rows = pd.concat([rows, stats], axis=1)
    if onnx_path is not None:
        codes = encode_real(params, onnx_path, files)
        rows = pd.concat([rows, pd.DataFrame(codes, columns=[f"code_{j}" for j in range(codes.shape[1])])], axis=1)
    return rows


def sample_ids(paths: pd.Series, classes: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Manifest row ids of the `per_class` rows of each class with the smallest hash of (seed, path).

    A hash rather than a random draw: an image kept in a new dataset version is sampled again,
    so two versions that differ by a few files are compared on mostly the same images.
    """
    keys = [int.from_bytes(hashlib.sha256(f"{seed}\n{p}".encode()).digest()[:8], "big") for p in paths]
    order = pd.DataFrame({"class": classes, "key": keys}).sort_values(["class", "key"], kind="stable")
    return np.sort(order.groupby("class", sort=False).head(per_class).index.to_numpy())


def image_statistics(path: str | Path) -> dict[str, float]:
    """Size, luminance mean (brightness) and spread (contrast), channel means, and sharpness as
    the variance of the Laplacian of the luminance (blur lowers it)."""
    from PIL import Image
    from scipy import ndimage

    from adalabelhash.data.images import read_rgb

    image = read_rgb(path)
    width, height = image.size
    image.thumbnail((STATS_MAX_SIDE, STATS_MAX_SIDE), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float64)
    luminance = pixels @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
    red, green, blue = pixels.reshape(-1, 3).mean(axis=0)
    return {"width": width, "height": height, "brightness": luminance.mean(), "contrast": luminance.std(),
            "mean_red": red, "mean_green": green, "mean_blue": blue,
            "sharpness": ndimage.laplace(luminance, mode="reflect").var()}


def encode_real(params: MonitorParams, onnx_path: str | Path, files: list[str]) -> np.ndarray:
    """The encoder's real-valued outputs (n, K), preprocessed exactly as the encode step does."""
    from adalabelhash.onnx_runtime import open_session
    from components.encode import iter_decoded_batches

    session = open_session(onnx_path)
    name, size = session.get_inputs()[0].name, session.get_inputs()[0].shape[2]
    outputs = [session.run(None, {name: batch})[0]
               for batch in iter_decoded_batches(files, size, params.batch_size, params.decode_threads)]
    return np.concatenate(outputs).astype(np.float32)


def write_profile(frame: pd.DataFrame, path: str | Path) -> None:
    from adalabelhash.fileio import atomic_output

    with atomic_output(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_profile(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: reference profile not found (write one with `adalabelhash monitor --profile-only`)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise UserError(f"{path}: not a readable Parquet profile ({exc.__class__.__name__})") from None
    missing = [c for c in PROFILE_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: not a monitor profile (missing column(s) {', '.join(missing)})")
    return frame


def code_columns(frame: pd.DataFrame) -> list[str]:
    return [f"code_{j}" for j in range(sum(c.startswith("code_") for c in frame.columns))]


def load_codewords(path: str | Path) -> np.ndarray:
    """codewords.npy as export-codewords writes it: C x K bits in {0, 1}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: codewords not found (export-codewords writes codewords.npy)")
    try:
        codewords = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a numpy array file ({exc})") from None
    if codewords.ndim != 2 or not np.isin(codewords, (0, 1)).all():
        raise UserError(f"{path}: expected a C x K array of 0/1 bits, got shape {codewords.shape}")
    return codewords.astype(np.uint8)


# --- detect ----------------------------------------------------------------------------------

def detect_drift(params: MonitorParams, reference: pd.DataFrame, current: pd.DataFrame,
                 codewords: np.ndarray | None = None, quality: dict | None = None) -> dict[str, Any]:
    """drift.json: {"retrain", "reasons", "data", "codes", "quality", ...}; each reason is
    {"section", "check", "message", ...}."""
    ref_codes, cur_codes = code_columns(reference), code_columns(current)
    check_code_lengths(len(ref_codes), len(cur_codes), codewords)
    data, data_reasons = data_drift(params, reference, current)
    if ref_codes:
        codes, code_reasons = code_drift(params, reference[ref_codes].to_numpy(), current[cur_codes].to_numpy(),
                                         codewords, class_names(reference, codewords))
    else:
        codes, code_reasons = {"skipped": "no encoder given: profiles without codes"}, []
    checked, quality_reasons = quality_drop(params, quality)
    reasons = data_reasons + code_reasons + quality_reasons
    return {
        "retrain": bool(reasons),
        "reasons": reasons,
        "reference": _sizes(reference),
        "current": _sizes(current),
        "data": data,
        "codes": codes,
        "quality": checked,
        "params": asdict(params),
    }


def check_code_lengths(reference_bits: int, current_bits: int | None, codewords: np.ndarray | None) -> None:
    """Codes compare only from one encoder: equal lengths, codewords included (current_bits None:
    not known yet, but an encoder is given)."""
    if current_bits is not None and bool(reference_bits) != bool(current_bits):
        which = "reference" if reference_bits else "current"
        raise UserError(f"only the {which} profile has codes: profile both with the champion's encoder (--onnx), or neither")
    if current_bits is None and not reference_bits:
        raise UserError("an encoder is given but the reference profile has no codes: "
                        "record the reference with the champion's encoder (--profile-only --onnx)")
    if current_bits and current_bits != reference_bits:
        raise UserError(f"the reference profile has {reference_bits}-bit codes, the current one {current_bits}-bit: "
                        "profile both with the champion's encoder")
    if codewords is not None and codewords.shape[1] != reference_bits:
        raise UserError(f"the codewords have {codewords.shape[1]} bits but the reference profile's codes have "
                        f"{reference_bits or 'none (profiled without --onnx)'}: use the champion's codewords and encoder")


def data_drift(params: MonitorParams, reference: pd.DataFrame, current: pd.DataFrame) -> tuple[dict, list[dict]]:
    """Class counts (chi-square) + image statistics per class (KS), one Holm family."""
    from scipy import stats

    ref_counts = reference.groupby("class", sort=False)["class_images"].first()  # manifest order
    cur_counts = current.groupby("class", sort=False)["class_images"].first()
    classes = [*ref_counts.index, *(c for c in cur_counts.index if c not in ref_counts.index)]
    ref_counts = ref_counts.reindex(classes, fill_value=0)
    cur_counts = cur_counts.reindex(classes, fill_value=0)
    ref_share, cur_share = ref_counts / ref_counts.sum(), cur_counts / cur_counts.sum()
    missing = [c for c in classes if cur_counts[c] == 0]
    new = [c for c in classes if ref_counts[c] == 0]
    if len(classes) > 1:
        chi2, p_classes = stats.chi2_contingency(np.stack([ref_counts, cur_counts]))[:2]
    else:
        chi2, p_classes = 0.0, 1.0
    tests = []  # (p value, where the result goes)
    class_test = {"chi2": float(chi2), "p_value": float(p_classes)}
    tests.append((p_classes, class_test))
    rows = []
    for name in (c for c in classes if c not in missing and c not in new):
        ref_rows, cur_rows = reference[reference["class"] == name], current[current["class"] == name]
        for stat in IMAGE_STATS:
            a, b = ref_rows[stat].to_numpy(float), cur_rows[stat].to_numpy(float)
            result = ks_test(a, b)
            row = {"class": name, "statistic": stat, "ks": float(result.statistic), "p_value": float(result.pvalue),
                   "reference_median": float(np.median(a)), "current_median": float(np.median(b)),
                   "reference_n": len(a), "current_n": len(b)}
            rows.append(row)
            tests.append((row["p_value"], row))
    for (_, target), adjusted in zip(tests, holm([p for p, _ in tests])):
        target["p_adjusted"] = float(adjusted)
    for row in rows:
        row["flagged"] = row["p_adjusted"] < params.alpha and row["ks"] >= params.min_ks
    share_change = (cur_share - ref_share)
    shifted = [c for c in classes if c not in missing and c not in new and abs(share_change[c]) >= params.min_share_shift]
    class_test["flagged"] = class_test["p_adjusted"] < params.alpha and bool(shifted)
    data = {
        "classes": {
            "table": [{"class": c, "reference_images": int(ref_counts[c]), "current_images": int(cur_counts[c]),
                       "reference_share": float(ref_share[c]), "current_share": float(cur_share[c]),
                       "share_change": float(share_change[c])} for c in classes],
            "missing": missing, "new": new, "shifted": shifted if class_test["flagged"] else [],
            "max_share_change": float(share_change.abs().max()), **class_test,
        },
        "image_statistics": rows,
        "tests": len(tests),
    }
    reasons = []
    for c in missing:
        reasons.append(_reason("data", "class missing", f"class missing: {c} has no images "
                               f"(reference {ref_counts[c]})", classes=[c]))
    for c in new:
        reasons.append(_reason("data", "new class", f"new class: {c} ({cur_counts[c]} images), not in the reference",
                               classes=[c]))
    if class_test["flagged"]:
        worst = max(shifted, key=lambda c: abs(share_change[c]))
        reasons.append(_reason("data", "class shares shifted",
                               f"class shares shifted (chi-square p{_p(class_test['p_adjusted'])}): {worst} "
                               f"{ref_share[worst]:.1%} -> {cur_share[worst]:.1%}", classes=shifted))
    for stat in IMAGE_STATS:
        flagged = [r for r in rows if r["statistic"] == stat and r["flagged"]]
        if flagged:
            worst = max(flagged, key=lambda r: r["ks"])
            reasons.append(_reason(
                "data", "image statistic shifted",
                f"image {stat} shifted in {len(flagged)} class(es) ({', '.join(r['class'] for r in flagged)}); "
                f"largest in {worst['class']}: KS {worst['ks']:.2f}, median {worst['reference_median']:.4g} -> "
                f"{worst['current_median']:.4g}", statistic=stat, classes=[r["class"] for r in flagged]))
    return data, reasons


def code_drift(params: MonitorParams, reference: np.ndarray, current: np.ndarray, codewords: np.ndarray | None,
               names: list[str]) -> tuple[dict, list[dict]]:
    """The encoder's outputs on the new images vs on the reference images; no labels used."""
    from scipy import stats

    ref_bits, cur_bits = reference >= 0, current >= 0  # the binarisation of adalabelhash.codes
    ref_ones, cur_ones = ref_bits.mean(axis=0), cur_bits.mean(axis=0)
    tests, bit_rows = [], []
    for j in range(reference.shape[1]):
        table = np.array([[ref_bits[:, j].sum(), (~ref_bits[:, j]).sum()], [cur_bits[:, j].sum(), (~cur_bits[:, j]).sum()]])
        p = 1.0 if (table.sum(axis=0) == 0).any() else float(stats.chi2_contingency(table)[1])
        row = {"bit": j, "reference_ones": float(ref_ones[j]), "current_ones": float(cur_ones[j]), "p_value": p,
               "reference_entropy": _entropy(ref_ones[j]), "current_entropy": _entropy(cur_ones[j])}
        bit_rows.append(row)
        tests.append((p, row))
    ref_near, cur_near = float((np.abs(reference) < NEAR_ZERO).mean()), float((np.abs(current) < NEAR_ZERO).mean())
    ref_buckets, cur_buckets = _buckets(ref_bits), _buckets(cur_bits)
    codes: dict[str, Any] = {
        "bits": int(reference.shape[1]),
        "near_zero_share": {"reference": ref_near, "current": cur_near},
        "distinct_per_image": {"reference": ref_buckets[0], "current": cur_buckets[0]},
        "largest_bucket_share": {"reference": ref_buckets[1], "current": cur_buckets[1]},
        "mean_bit_entropy": {"reference": float(np.mean([r["reference_entropy"] for r in bit_rows])),
                             "current": float(np.mean([r["current_entropy"] for r in bit_rows]))},
        "per_bit": bit_rows,
    }
    if codewords is not None:
        ref_dist, ref_nearest = nearest_codewords(ref_bits, codewords)
        cur_dist, cur_nearest = nearest_codewords(cur_bits, codewords)
        ks = ks_test(ref_dist, cur_dist)
        distance = {"ks": float(ks.statistic), "p_value": float(ks.pvalue),
                    "reference_mean": float(ref_dist.mean()), "current_mean": float(cur_dist.mean()),
                    "reference_histogram": np.bincount(ref_dist, minlength=codewords.shape[1] + 1).tolist(),
                    "current_histogram": np.bincount(cur_dist, minlength=codewords.shape[1] + 1).tolist()}
        ref_hist = np.bincount(ref_nearest, minlength=len(codewords))
        cur_hist = np.bincount(cur_nearest, minlength=len(codewords))
        used = (ref_hist + cur_hist) > 0
        chi2, p = stats.chi2_contingency(np.stack([ref_hist[used], cur_hist[used]]))[:2] if used.sum() > 1 else (0.0, 1.0)
        change = cur_hist / cur_hist.sum() - ref_hist / ref_hist.sum()
        nearest = {"classes": names, "reference_histogram": ref_hist.tolist(), "current_histogram": cur_hist.tolist(),
                   "share_change": change.tolist(), "max_share_change": float(np.abs(change).max()),
                   "chi2": float(chi2), "p_value": float(p)}
        tests += [(distance["p_value"], distance), (nearest["p_value"], nearest)]
        codes.update(codeword_distance=distance, nearest_codeword=nearest)
    for (_, target), adjusted in zip(tests, holm([p for p, _ in tests])):
        target["p_adjusted"] = float(adjusted)
    codes["tests"] = len(tests)

    reasons = []
    moved = [r for r in bit_rows if r["p_adjusted"] < params.alpha
             and abs(r["current_ones"] - r["reference_ones"]) >= params.min_bit_shift]
    moved_bits = {r["bit"] for r in moved}
    for row in bit_rows:
        row["flagged"] = row["bit"] in moved_bits
    if moved:
        worst = max(moved, key=lambda r: abs(r["current_ones"] - r["reference_ones"]))
        reasons.append(_reason("codes", "bit balance shifted",
                               f"{len(moved)} of {len(bit_rows)} code bits changed their share of ones; bit {worst['bit']}: "
                               f"{worst['reference_ones']:.0%} -> {worst['current_ones']:.0%}", bits=[r["bit"] for r in moved]))
    if cur_near - ref_near > params.max_near_zero_increase:
        reasons.append(_reason("codes", "near-zero outputs rose",
                               f"outputs with |tanh| < {NEAR_ZERO}: {ref_near:.1%} -> {cur_near:.1%} (the encoder is unsure)"))
    if cur_buckets[1] - ref_buckets[1] > params.max_bucket_increase:
        reasons.append(_reason("codes", "codes collapsing",
                               f"largest bucket (images sharing one code): {ref_buckets[1]:.1%} -> {cur_buckets[1]:.1%}"))
    if codewords is not None:
        distance, nearest = codes["codeword_distance"], codes["nearest_codeword"]
        if distance["p_adjusted"] < params.alpha and distance["ks"] >= params.min_ks:
            reasons.append(_reason("codes", "codes moved from the codewords",
                                   f"Hamming distance to the nearest codeword: mean {distance['reference_mean']:.2f} -> "
                                   f"{distance['current_mean']:.2f} (KS {distance['ks']:.2f})"))
        if nearest["p_adjusted"] < params.alpha and nearest["max_share_change"] >= params.min_share_shift:
            worst = int(np.argmax(np.abs(nearest["share_change"])))
            reasons.append(_reason("codes", "nearest-codeword classes shifted",
                                   f"images whose nearest codeword is {names[worst]}: "
                                   f"{nearest['share_change'][worst]:+.1%} of all (chi-square p{_p(nearest['p_adjusted'])})"))
    return codes, reasons


def quality_drop(params: MonitorParams, quality: dict | None) -> tuple[dict, list[dict]]:
    """{"champion_version", "recorded_mAP", "mAP_on_new"} -> the drop, flagged above max_map_drop."""
    if quality is None:
        return {"skipped": "no champion score on the new queries given"}, []
    if not isinstance(quality, dict):
        raise UserError(f"quality must be a JSON object, got {type(quality).__name__}")
    for key in ("recorded_mAP", "mAP_on_new"):
        value = quality.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise UserError(f"quality: {key} must be a number in [0, 1], got {value!r}")
    drop = float(quality["recorded_mAP"]) - float(quality["mAP_on_new"])
    checked = {"champion_version": quality.get("champion_version"), "recorded_mAP": float(quality["recorded_mAP"]),
               "mAP_on_new": float(quality["mAP_on_new"]), "drop": drop, "flagged": drop > params.max_map_drop}
    if not checked["flagged"]:
        return checked, []
    return checked, [_reason("quality", "champion mAP dropped",
                             f"champion v{checked['champion_version']} mAP on the new queries {checked['mAP_on_new']:.4f}, "
                             f"recorded {checked['recorded_mAP']:.4f}: drop {drop:.4f} > {params.max_map_drop}")]


def holm(p_values: list[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values: the chance of ANY false flag stays <= alpha, the right
    error rate when one flag triggers a retraining."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p))))
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def ks_test(a: np.ndarray, b: np.ndarray):
    """Two-sample Kolmogorov-Smirnov; with ties scipy falls back from the exact to the asymptotic
    p-value and warns each time: expected here (integer sizes and distances)."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return stats.ks_2samp(a, b)


def nearest_codewords(bits: np.ndarray, codewords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Hamming distance to the nearest codeword, its row) per code; ties go to the first row."""
    bits, words = bits.astype(np.float32), codewords.astype(np.float32)
    distances = np.rint(bits @ (1 - words).T + (1 - bits) @ words.T).astype(np.int64)
    nearest = distances.argmin(axis=1)
    return distances[np.arange(len(bits)), nearest], nearest


def class_names(reference: pd.DataFrame, codewords: np.ndarray | None) -> list[str]:
    """Codeword row -> class name: the champion's classes, in its manifest's label order."""
    if codewords is None:
        return []
    order = _class_order(reference)
    return order if len(order) == len(codewords) else [f"codeword {i}" for i in range(len(codewords))]


def _class_order(frame: pd.DataFrame) -> list[str]:
    """The manifest's class order, read from the label strings (labels[i] = 1 for class i)."""
    order: dict[int, str] = {}
    width = 0
    for labels, name in zip(frame["labels"], frame["class"]):
        width = max(width, len(labels))
        if name != UNLABELLED:
            order.setdefault(labels.index("1"), name)
    return [order.get(i, f"class {i}") for i in range(width)]


def _buckets(bits: np.ndarray) -> tuple[float, float]:
    """(distinct codes / N, largest bucket / N)."""
    _, counts = np.unique(np.packbits(bits, axis=1), axis=0, return_counts=True)
    return len(counts) / len(bits), float(counts.max() / len(bits))


def _entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else float(-(p * math.log2(p) + (1 - p) * math.log2(1 - p)))


def _p(p: float) -> str:
    """'=0.012', or '<1e-300' where the p-value underflowed to 0."""
    return f"={p:.2g}" if p > 0 else "<1e-300"


def _reason(section: str, check: str, message: str, **details) -> dict:
    return {"section": section, "check": check, "message": message, **details}


def _sizes(frame: pd.DataFrame) -> dict:
    return {"images_profiled": len(frame), "classes": int(frame["class"].nunique()),
            "images": int(frame.groupby("class")["class_images"].first().sum()), "bits": len(code_columns(frame))}


# --- report ----------------------------------------------------------------------------------

def write_report(drift: dict, reference: pd.DataFrame, current: pd.DataFrame, out_dir: str | Path) -> None:
    """drift.json + report.html (self-contained: styles inline, figures as base64 PNG, no scripts)."""
    from adalabelhash.fileio import write_json, write_text

    out_dir = Path(out_dir)
    write_text(out_dir / REPORT_NAME, render_html(drift, reference, current))
    write_json(out_dir / DRIFT_NAME, drift)  # last: its presence means the report is complete


def render_html(drift: dict, reference: pd.DataFrame, current: pd.DataFrame) -> str:
    esc = html.escape
    verdict = "retrain" if drift["retrain"] else "no drift found"
    parts = [f"<h1>Drift report: {esc(verdict)}</h1>",
             f"<p>Reference: {drift['reference']['images']:,} images, {drift['reference']['classes']} classes "
             f"({drift['reference']['images_profiled']:,} profiled). Current: {drift['current']['images']:,} images, "
             f"{drift['current']['classes']} classes ({drift['current']['images_profiled']:,} profiled).</p>"]
    if drift["reasons"]:
        parts.append("<ul class='reasons'>" + "".join(f"<li><b>{esc(r['section'])}</b>: {esc(r['message'])}</li>"
                                                      for r in drift["reasons"]) + "</ul>")
    else:
        parts.append("<p class='ok'>No test crossed its threshold.</p>")

    classes = drift["data"]["classes"]
    parts.append("<h2>Data: classes</h2>")
    parts.append(f"<p>Chi-square on all images' class counts: p{esc(_p(classes['p_value']))} "
                 f"(Holm-adjusted p{esc(_p(classes['p_adjusted']))}); largest share change {classes['max_share_change']:.1%}.</p>")
    flagged_classes = set(classes["missing"]) | set(classes["new"]) | set(classes["shifted"])
    parts.append(_table(["class", "reference", "current", "reference share", "current share", "change"],
                        [[r["class"], r["reference_images"], r["current_images"], f"{r['reference_share']:.1%}",
                          f"{r['current_share']:.1%}", f"{r['share_change']:+.1%}"] for r in classes["table"]],
                        [r["class"] in flagged_classes for r in classes["table"]]))
    parts.append(_figure(_plot_class_shares(classes["table"]), "class shares"))
    parts.append("<h2>Data: image statistics</h2>")
    parts.append(_figure(_plot_image_stats(reference, current), "image statistics, all classes"))
    rows = drift["data"]["image_statistics"]
    flagged = [r for r in rows if r["flagged"]]
    header = ["class", "statistic", "KS", "p (Holm)", "reference median", "current median"]
    as_row = lambda r: [r["class"], r["statistic"], f"{r['ks']:.2f}", _p(r['p_adjusted']).lstrip('='),
                        f"{r['reference_median']:.4g}", f"{r['current_median']:.4g}"]  # noqa: E731
    parts.append(f"<p>{len(flagged)} of {len(rows)} per-class tests flagged.</p>")
    if flagged:
        largest = sorted(flagged, key=lambda r: -r["ks"])[:FLAGGED_SHOWN]
        parts.append(_table(header, [as_row(r) for r in largest], [True] * len(largest)))
        if len(flagged) > len(largest):
            parts.append(f"<p>... the {len(largest)} largest shown; all in drift.json.</p>")
    parts.append("<details><summary>all per-class tests</summary>"
                 + _table(header, [as_row(r) for r in rows], [r["flagged"] for r in rows]) + "</details>")

    codes = drift["codes"]
    parts.append("<h2>Codes (the champion's encoder, no labels)</h2>")
    if "skipped" in codes:
        parts.append(f"<p>{esc(codes['skipped'])}</p>")
    else:
        summary = [["share of |tanh| &lt; 0.1", codes["near_zero_share"]],
                   ["distinct codes / images", codes["distinct_per_image"]],
                   ["largest bucket / images", codes["largest_bucket_share"]],
                   ["mean bit entropy (bits)", codes["mean_bit_entropy"]]]
        if "codeword_distance" in codes:
            d = codes["codeword_distance"]
            summary.append(["mean distance to nearest codeword", {"reference": d["reference_mean"], "current": d["current_mean"]}])
        parts.append(_table(["measure", "reference", "current"],
                            [[name, f"{v['reference']:.3f}", f"{v['current']:.3f}"] for name, v in summary], raw=True))
        parts.append(_figure(_plot_codes(codes), "code statistics"))
    quality = drift["quality"]
    parts.append("<h2>Quality (labelled)</h2>")
    if "skipped" in quality:
        parts.append(f"<p>{esc(quality['skipped'])}</p>")
    else:
        parts.append(_table(["champion", "recorded mAP", "mAP on the new queries", "drop"],
                            [[str(quality["champion_version"]), f"{quality['recorded_mAP']:.4f}",
                              f"{quality['mAP_on_new']:.4f}", f"{quality['drop']:+.4f}"]], [quality["flagged"]]))
    params = drift["params"]
    parts.append("<h2>Method</h2><p>Two-sample Kolmogorov-Smirnov tests per class and statistic, chi-square tests on "
                 "class counts, per-bit shares of ones and nearest-codeword classes (scipy.stats); p-values "
                 f"Holm-adjusted within the data tests ({drift['data']['tests']}) and within the code tests; "
                 f"a flag needs p &lt; {params['alpha']} and an effect of at least: KS {params['min_ks']}, share "
                 f"{params['min_share_shift']}, bit share {params['min_bit_shift']}. Thresholds: params.yaml "
                 "<code>monitor:</code>.</p>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Drift report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            "tr.flag{background:#fdd}.reasons li{color:#a00}.ok{color:#070}img{max-width:100%}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def _table(header: list[str], rows: list[list], flags: list[bool] | None = None, raw: bool = False) -> str:
    cell = (lambda v: str(v)) if raw else (lambda v: html.escape(str(v)))
    flags = flags or [False] * len(rows)
    body = "".join(f"<tr{' class=flag' if f else ''}>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row, f in zip(rows, flags))
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + body + "</table>"


def _figure(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_class_shares(table: list[dict]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(table) + 2), 3))
    x = np.arange(len(table))
    ax.bar(x - 0.2, [r["reference_share"] for r in table], 0.4, label="reference")
    ax.bar(x + 0.2, [r["current_share"] for r in table], 0.4, label="current")
    ax.set_xticks(x, [r["class"] for r in table], rotation=60 if len(table) > 12 else 0, fontsize=8)
    ax.set_ylabel("share of images")
    ax.legend()
    return fig


def _plot_image_stats(reference: pd.DataFrame, current: pd.DataFrame):
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(12, 5))
    for ax, stat in zip(axes.ravel(), IMAGE_STATS):
        both = np.concatenate([reference[stat], current[stat]]).astype(float)
        bins = np.histogram_bin_edges(both, bins=30) if np.ptp(both) > 0 else 1
        ax.hist(reference[stat], bins=bins, alpha=0.5, density=True, label="reference")
        ax.hist(current[stat], bins=bins, alpha=0.5, density=True, label="current")
        ax.set_title(stat, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_codes(codes: dict):
    plt = _pyplot()
    panels = 1 + ("codeword_distance" in codes) * 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.2), squeeze=False)
    axes = axes[0]
    bits = np.arange(codes["bits"])
    axes[0].bar(bits - 0.2, [r["reference_ones"] for r in codes["per_bit"]], 0.4, label="reference")
    axes[0].bar(bits + 0.2, [r["current_ones"] for r in codes["per_bit"]], 0.4, label="current")
    axes[0].set(title="share of ones per bit", xlabel="bit")
    axes[0].legend(fontsize=7)
    if "codeword_distance" in codes:
        d, n = codes["codeword_distance"], codes["nearest_codeword"]
        steps = np.arange(len(d["reference_histogram"]))
        for key, label in (("reference_histogram", "reference"), ("current_histogram", "current")):
            counts = np.asarray(d[key], float)
            axes[1].step(steps, counts / counts.sum(), where="mid", label=label)
            share = np.asarray(n[key], float)
            axes[2].bar(np.arange(len(share)) + (-0.2 if label == "reference" else 0.2), share / share.sum(), 0.4, label=label)
        axes[1].set(title="Hamming distance to nearest codeword", xlabel="bits")
        axes[2].set(title="nearest-codeword class")
        axes[2].set_xticks(np.arange(len(n["classes"])), n["classes"], rotation=60 if len(n["classes"]) > 12 else 0, fontsize=7)
    fig.tight_layout()
    return fig


# --- the step --------------------------------------------------------------------------------

def monitor(params: MonitorParams, reference_profile_path: str | Path, manifest_path: str | Path,
            data_root: str | Path | None, onnx_path: str | Path | None, codewords_path: str | Path | None,
            quality: dict | str | Path | None, out_dir: str | Path, reference_dataset: str | None = None,
            force: bool = False) -> dict:
    """Profile the new data with the champion's encoder, compare with the reference profile, decide
    the trigger, and write out_dir/{drift.json, report.html, profile.parquet} (whole or nothing).

    `reference_dataset`: the champion's dataset fingerprint (another one means a new dataset version).
    """
    from adalabelhash.data.manifest import Manifest
    from adalabelhash.fileio import atomic_directory, read_json

    reference = read_profile(reference_profile_path)  # inputs checked before the costly profiling
    codewords = load_codewords(codewords_path) if codewords_path is not None else None
    if isinstance(quality, (str, Path)):
        quality = read_json(quality)
    check_code_lengths(len(code_columns(reference)), None if onnx_path is not None else 0, codewords)
    current = profile(params, manifest_path, data_root, onnx_path)
    drift = detect_drift(params, reference, current, codewords, quality)
    new_data = reference_dataset is not None and reference_dataset != Manifest.load(manifest_path).fingerprint()
    drift.update(trigger(params, drift["reasons"], new_data, force))
    with atomic_directory(out_dir) as tmp:
        write_profile(current, tmp / PROFILE_NAME)
        write_report(drift, reference, current, tmp)
    return drift


def trigger(params: MonitorParams, reasons: list, new_data: bool, force: bool) -> dict:
    """Whether to retrain, and the one reason a run records (`trigger_reason`): forced, drift, new data,
    or schedule (a scheduled run that found nothing new: it skips training)."""
    retrain_for_data = new_data and params.retrain_on_new_data
    reason = "forced" if force else "drift" if reasons else "new data" if retrain_for_data else "schedule"
    return {"retrain": bool(force or reasons or retrain_for_data), "trigger_reason": reason, "new_data": new_data}


def monitor_champion(params: MonitorParams, champion_dir: str | Path, manifest_path: str | Path,
                     data_root: str | Path | None, out_dir: str | Path, force: bool = False) -> dict:
    """The step as the pipelines run it: the new data against what the score-champion step fetched and
    measured (the champion's encoder, codewords and reference profile; its mAP re-scored on this data)."""
    from adalabelhash.fileio import atomic_directory, read_json, write_json, write_text
    from components.score_champion import MODEL_DIR, SCORE_FILE

    score = read_json(Path(champion_dir) / SCORE_FILE)
    model = Path(champion_dir) / MODEL_DIR
    extra = model / "extra_files"  # what convert-onnx logged beside the ONNX file
    if score.get("version") is not None and (extra / PROFILE_NAME).is_file():
        champion = score["champion"]
        quality = None if champion.get("recorded") is None else {
            "champion_version": score["version"], "recorded_mAP": champion["recorded"], "mAP_on_new": score["value"]}
        codewords = extra / "codewords.npy"
        return monitor(params, extra / PROFILE_NAME, manifest_path, data_root, model / "model.onnx",
                       codewords if codewords.is_file() else None, quality, out_dir,
                       reference_dataset=champion.get("recorded_dataset") or None, force=force)
    why = ("no current champion" if score.get("version") is None else
           f"champion v{score['version']} has no reference profile (registered before monitoring)")
    drift = {"reasons": [], "note": f"{why}: nothing to compare with", **trigger(params, [], True, force)}
    with atomic_directory(out_dir) as tmp:
        write_text(tmp / REPORT_NAME, "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Drift report"
                   f"</title></head><body><h1>Drift report: {html.escape(drift['note'])}</h1><p>Trigger: "
                   f"{html.escape(drift['trigger_reason'])}.</p></body></html>\n")
        write_json(tmp / DRIFT_NAME, drift)
    return drift


def monitor_tracked(params: MonitorParams, champion_dir: Path, manifest_path: Path, data_root: str | Path | None,
                    out_dir: Path, upstream=None, force: bool = False) -> dict:
    """monitor_champion(), its report and verdict logged to the pipeline's MLflow run when there is one."""
    from adalabelhash import tracking

    drift = monitor_champion(params, champion_dir, manifest_path, data_root, out_dir, force)
    if upstream is not None:
        ref = upstream if isinstance(upstream, tracking.RunRef) else tracking.RunRef.load(upstream)
        tracking.log_artifacts(ref, [Path(out_dir) / DRIFT_NAME, Path(out_dir) / REPORT_NAME], "monitor")
        tracking.set_tags(ref, {"monitor.retrain": drift["retrain"], "monitor.trigger": drift["trigger_reason"],
                                "monitor.reasons": " | ".join(r["message"] for r in drift["reasons"])[:5000] or "none"})
    return drift


def summary_line(drift: dict, out_dir: Path) -> str:
    verdict = "RETRAIN" if drift["retrain"] else "no retraining needed"
    why = drift.get("note") or f"{len(drift['reasons'])} drift reason(s)"
    return f"monitor: {verdict} (trigger: {drift['trigger_reason']}; {why}) -> {out_dir / DRIFT_NAME}, {out_dir / REPORT_NAME}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `monitor:`")
    parser.add_argument("--champion", type=Path, help="output of score-champion: the champion's encoder, "
                        "codewords, reference profile and re-scored mAP (what the pipelines pass)")
    parser.add_argument("--run", type=Path, help="with --champion: mlflow_run.json to log the report to")
    parser.add_argument("--reference", type=Path, help="or explicitly: profile.parquet of the champion's own data")
    parser.add_argument("--manifest", required=True, type=Path, help="the new dataset version's manifest.parquet")
    parser.add_argument("--data-root", help="directory or URL (s3://...) the manifest paths are relative to "
                        "(default: the root recorded in the manifest)")
    parser.add_argument("--onnx", type=Path, help="the champion's model.onnx: compare its codes too")
    parser.add_argument("--codewords", type=Path, help="the champion's codewords.npy (export-codewords)")
    parser.add_argument("--quality", type=Path, help="JSON {champion_version, recorded_mAP, mAP_on_new}")
    parser.add_argument("--profile-only", action="store_true", help="only write OUT/profile.parquet (a reference)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_section

    params = load_section(MonitorParams, "monitor", args.params)
    if args.profile_only:
        frame = profile(params, args.manifest, args.data_root, args.onnx)
        write_profile(frame, args.out / PROFILE_NAME)
        print(f"monitor: profiled {len(frame):,} images ({frame['class'].nunique()} classes, "
              f"{len(code_columns(frame))}-bit codes) -> {args.out / PROFILE_NAME}")
        return
    if args.champion is not None:
        drift = monitor_tracked(params, args.champion, args.manifest, args.data_root, args.out, args.run)
    elif args.reference is not None:
        drift = monitor(params, args.reference, args.manifest, args.data_root, args.onnx, args.codewords, args.quality,
                        args.out)
    else:
        raise UserError("--champion (score-champion's output) or --reference is required (or --profile-only)")
    print(summary_line(drift, args.out))
    for reason in drift["reasons"]:
        print(f"  {reason['section']}: {reason['message']}")
