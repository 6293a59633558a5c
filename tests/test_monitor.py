"""The monitor step on the digits: drift found where it should be, and not where it should not."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter, ImageOps

from adalabelhash.errors import UserError
from components.monitor import (IMAGE_STATS, MonitorParams, detect_drift, holm, monitor, profile, read_profile,
                                write_profile, write_report)
from components.prepare import PrepareParams, prepare

PARAMS = MonitorParams(sample_per_class=30)  # 300 images per profile


def make_variant(source: Path, target: Path, edit=None, keep=None) -> Path:
    """A copy of the digits tree with each image passed through `edit`; files failing `keep`
    (class, index within the class) are left out. Returns its manifest."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        kept = [f for i, f in enumerate(files) if keep is None or keep(folder.name, i)]
        if not kept:
            continue
        (target / folder.name).mkdir(parents=True)
        for f in kept:
            if edit is None:
                shutil.copyfile(f, target / folder.name / f.name)
            else:
                edit(Image.open(f)).save(target / folder.name / f.name, compress_level=0)
    prepare(PrepareParams(source="imagefolder", root=str(target), query_per_class=10, val_per_class=5),
            target.parent / f"{target.name}-prepared")
    return target.parent / f"{target.name}-prepared" / "manifest.parquet"


@pytest.fixture(scope="module")
def reference(trained):
    return profile(PARAMS, trained["manifest"], trained["root"], trained["onnx"])


@pytest.fixture(scope="module")
def codewords(trained):
    return np.load(trained["codewords"] / "codewords.npy")


@pytest.fixture(scope="module")
def variants(trained, tmp_path_factory):
    base = tmp_path_factory.mktemp("variants")
    root = trained["root"]
    return {
        "inverted": (make_variant(root, base / "inverted", edit=lambda im: ImageOps.invert(im.convert("L"))), base / "inverted"),
        "blurred": (make_variant(root, base / "blurred", edit=lambda im: im.filter(ImageFilter.GaussianBlur(1))),
                    base / "blurred"),
        "class_missing": (make_variant(root, base / "class_missing", keep=lambda c, i: c != "3"), base / "class_missing"),
        # the retraining scenario: a tenth of each class's images removed
        "tenth_removed": (make_variant(root, base / "tenth_removed", keep=lambda c, i: i % 10 != 0), base / "tenth_removed"),
    }


def current_profile(variants, trained, name):
    manifest, root = variants[name]
    return profile(PARAMS, manifest, root, trained["onnx"])


def checks(drift, section=None):
    return {r["check"] for r in drift["reasons"] if section is None or r["section"] == section}


def test_profile_rows_sample_and_codes(trained, reference):
    assert len(reference) == 300 and reference["class"].value_counts().eq(30).all()
    assert reference["class_images"].groupby(reference["class"]).first().sum() == 1797
    assert (reference["width"] == 8).all() and (reference["height"] == 8).all()
    assert {"train", "query", "database"} <= {s for split in reference["split"] for s in split.split("+")}
    codes = reference[[f"code_{j}" for j in range(16)]].to_numpy()
    assert "code_16" not in reference and np.abs(codes).max() <= 1.0 and np.abs(codes).mean() > 0.1
    again = profile(PARAMS, trained["manifest"], trained["root"])
    assert again["id"].tolist() == reference["id"].tolist()  # seeded: the same images
    assert not any(c.startswith("code_") for c in again.columns)
    other_seed = profile(MonitorParams(sample_per_class=30, seed=1), trained["manifest"], trained["root"])
    assert other_seed["id"].tolist() != reference["id"].tolist()


def test_same_data_is_not_drift(trained, reference, codewords):
    current = profile(PARAMS, trained["manifest"], trained["root"], trained["onnx"])
    drift = detect_drift(PARAMS, reference, current, codewords,
                         {"champion_version": "2", "recorded_mAP": 0.9, "mAP_on_new": 0.89})
    assert drift["retrain"] is False and drift["reasons"] == []
    assert json.loads(json.dumps(drift)) == drift  # plain JSON types throughout
    assert drift["codes"]["codeword_distance"]["ks"] == 0.0
    assert drift["codes"]["nearest_codeword"]["classes"] == [str(d) for d in range(10)]
    assert drift["quality"]["drop"] == pytest.approx(0.01) and not drift["quality"]["flagged"]
    assert drift["data"]["tests"] == 1 + 10 * len(IMAGE_STATS)


def test_inverted_images_are_data_and_code_drift(trained, variants, reference, codewords):
    drift = detect_drift(PARAMS, reference, current_profile(variants, trained, "inverted"), codewords)
    assert drift["retrain"] is True
    shifted = {r["statistic"] for r in drift["reasons"] if r["check"] == "image statistic shifted"}
    assert "brightness" in shifted
    assert checks(drift, "codes") & {"nearest-codeword classes shifted", "codes moved from the codewords",
                                     "bit balance shifted"}
    assert "class missing" not in checks(drift)


def test_blurred_images_are_flagged_on_sharpness(trained, variants, reference, codewords):
    drift = detect_drift(PARAMS, reference, current_profile(variants, trained, "blurred"), codewords)
    assert drift["retrain"] is True
    sharpness = [r for r in drift["reasons"] if r.get("statistic") == "sharpness"]
    assert sharpness and len(sharpness[0]["classes"]) == 10


def test_missing_class_is_flagged(trained, variants, reference, codewords):
    drift = detect_drift(PARAMS, reference, current_profile(variants, trained, "class_missing"), codewords)
    assert drift["retrain"] is True
    missing = [r for r in drift["reasons"] if r["check"] == "class missing"]
    assert [r["classes"] for r in missing] == [["3"]]
    assert drift["data"]["classes"]["missing"] == ["3"] and drift["data"]["classes"]["new"] == []
    # the other nine keep their shares (0.10 -> 0.11): not "shifted"
    assert "class shares shifted" not in checks(drift)


def test_tenth_removed_is_not_drift_but_a_quality_drop_is(trained, variants, reference, codewords):
    current = current_profile(variants, trained, "tenth_removed")
    assert current["class_images"].groupby(current["class"]).first().sum() < 1797 * 0.91
    drift = detect_drift(PARAMS, reference, current, codewords)
    assert drift["retrain"] is False, drift["reasons"]
    quality = {"champion_version": "2", "recorded_mAP": 0.87, "mAP_on_new": 0.82}
    drift = detect_drift(PARAMS, reference, current, codewords, quality)
    assert drift["retrain"] is True and [r["section"] for r in drift["reasons"]] == ["quality"]
    assert drift["quality"]["drop"] == pytest.approx(0.05) and "v2" in drift["reasons"][0]["message"]


def test_effect_size_floor_keeps_a_big_sample_from_flagging_a_trivial_shift():
    rng = np.random.default_rng(0)

    def frame(shift, n=20000):
        stats = {s: rng.normal(100, 10, n) for s in IMAGE_STATS}
        stats["brightness"] += shift
        return pd.DataFrame({"id": range(n), "path": [f"{i}.png" for i in range(n)], "split": "train",
                             "class": "a", "labels": "1", "class_images": n, **stats})

    reference = frame(0.0)
    trivial = detect_drift(PARAMS, reference, frame(0.8))  # 0.08 standard deviations
    row = next(r for r in trivial["data"]["image_statistics"] if r["statistic"] == "brightness")
    assert row["p_adjusted"] < PARAMS.alpha and row["ks"] < PARAMS.min_ks  # significant, yet trivial
    assert trivial["retrain"] is False
    real = detect_drift(PARAMS, reference, frame(10.0))  # one standard deviation
    assert [r.get("statistic") for r in real["reasons"]] == ["brightness"]


def test_holm_adjustment_by_hand():
    # sorted: 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> kept monotone at 0.06
    assert holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]


def test_bad_inputs_are_one_line_errors(trained, reference, tmp_path):
    with pytest.raises(UserError, match="reference profile not found") as missing:
        monitor(PARAMS, tmp_path / "nope.parquet", trained["manifest"], trained["root"], trained["onnx"], None, None,
                tmp_path / "out")
    assert "\n" not in str(missing.value)
    write_profile(reference, tmp_path / "reference.parquet")
    np.save(tmp_path / "codewords32.npy", np.random.default_rng(0).integers(0, 2, (10, 32), dtype=np.uint8))
    with pytest.raises(UserError, match="codewords have 32 bits but the reference profile's codes have 16") as other:
        monitor(PARAMS, tmp_path / "reference.parquet", trained["manifest"], trained["root"], trained["onnx"],
                tmp_path / "codewords32.npy", None, tmp_path / "out")
    assert "\n" not in str(other.value)
    write_profile(reference.drop(columns=[c for c in reference if c.startswith("code_")]), tmp_path / "plain.parquet")
    with pytest.raises(UserError, match="reference profile has no codes"):
        monitor(PARAMS, tmp_path / "plain.parquet", trained["manifest"], trained["root"], trained["onnx"], None, None,
                tmp_path / "out")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet profile"):
        read_profile(tmp_path / "junk.parquet")
    shorter = reference.drop(columns=[f"code_{j}" for j in range(8, 16)])
    with pytest.raises(UserError, match="reference profile has 16-bit codes, the current one 8-bit"):
        detect_drift(PARAMS, reference, shorter)
    with pytest.raises(UserError, match="mAP_on_new must be a number"):
        detect_drift(PARAMS, reference, reference, None, {"champion_version": "1", "recorded_mAP": 0.9})
    assert not (tmp_path / "out").exists()


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "adalabelhash.cli", "monitor", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_profile_then_monitor_writes_the_report(trained, variants, codewords, tmp_path):
    (tmp_path / "params.yaml").write_text("monitor: {sample_per_class: 30}\n")
    recorded = _cli("--profile-only", "--manifest", trained["manifest"], "--data-root", trained["root"],
                    "--onnx", trained["onnx"], "--out", "reference", cwd=tmp_path)
    assert recorded.returncode == 0, recorded.stderr
    assert len(read_profile(tmp_path / "reference" / "profile.parquet")) == 300

    manifest, root = variants["inverted"]
    (tmp_path / "quality.json").write_text(json.dumps({"champion_version": "4", "recorded_mAP": 0.9, "mAP_on_new": 0.4}))
    result = _cli("--reference", "reference/profile.parquet", "--manifest", manifest, "--data-root", root,
                  "--onnx", trained["onnx"], "--codewords", trained["codewords"] / "codewords.npy",
                  "--quality", "quality.json", "--out", "monitor", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RETRAIN" in result.stdout and "champion v4" in result.stdout
    drift = json.loads((tmp_path / "monitor" / "drift.json").read_text())
    assert drift["retrain"] is True and {"data", "codes", "quality"} <= {r["section"] for r in drift["reasons"]}
    assert sorted(p.name for p in (tmp_path / "monitor").iterdir()) == ["drift.json", "profile.parquet", "report.html"]

    failed = _cli("--reference", "missing.parquet", "--manifest", manifest, "--out", "failed", cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and failed.stderr.startswith("error: missing.parquet: reference profile")
    assert not (tmp_path / "failed").exists()


def test_report_is_self_contained_and_renders_in_chromium(trained, variants, reference, codewords, tmp_path):
    from test_mlflow_server import chromium_driver

    current = current_profile(variants, trained, "class_missing")
    drift = detect_drift(PARAMS, reference, current, codewords,
                         {"champion_version": "2", "recorded_mAP": 0.9, "mAP_on_new": 0.85})
    write_report(drift, reference, current, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"https?://", page)  # no CDN, no external script, style or image
    assert not re.search(r"<script|<link", page, re.I)
    browser = chromium_driver()
    try:
        browser.get((tmp_path / "report.html").as_uri())
        text = browser.find_element("tag name", "body").text
        images = browser.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
    finally:
        browser.quit()
    assert "Drift report: retrain" in text and "class missing: 3 has no images" in text
    assert "champion v2" in text
    assert len(images) == 3 and all(width and width > 100 for width in images)  # classes, image stats, codes
