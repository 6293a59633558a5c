"""Image checks and the Great Expectations gate, on real files made bad on purpose."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adalabelhash.data import images
from adalabelhash.data.images import image_facts, read_rgb
from adalabelhash.data.manifest import Manifest
from adalabelhash.data.validation import gather_facts, require_passed
from adalabelhash.errors import UserError
from components.prepare import PrepareParams, prepare
from components.validate import GateFailed, ValidateParams, validate

REPO = Path(__file__).resolve().parents[1]


def noise(size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (size, size, channels) if channels > 1 else (size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes whose IHDR claims width x height: decoding it would allocate it all."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
                     + chunk(b"IEND", b""))
    return path


def truncated_jpeg(path: Path) -> Path:
    Image.fromarray(noise(64)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    return path


# --- images -----------------------------------------------------------------------------------

def test_read_rgb_converts_grayscale_palette_alpha_and_16_bit(tmp_path):
    Image.fromarray(noise(8, channels=1)).save(tmp_path / "gray.png")
    Image.fromarray(noise(8)).convert("P").save(tmp_path / "palette.png")
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 0, 128, 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.arange(16, dtype=np.uint16).reshape(4, 4) * 4096).save(tmp_path / "gray16.png")
    for name in ("gray.png", "palette.png", "rgba.png", "gray16.png"):
        assert read_rgb(tmp_path / name).mode == "RGB"
    assert np.asarray(read_rgb(tmp_path / "gray16.png"))[..., 0].ravel().tolist() == [16 * i for i in range(16)]
    pixels = np.asarray(read_rgb(tmp_path / "rgba.png"))
    assert pixels[0, 0].tolist() == [0, 0, 0]  # fully transparent: black, not the hidden red
    assert pixels[0, 1, 0] in (100, 101) and pixels[1, 0].tolist() == [200, 0, 0]


def test_read_rgb_applies_the_exif_orientation(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 high, left half red
    stored[:, :10, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = np.asarray(read_rgb(tmp_path / "photo.jpg"))
    assert upright.shape == (20, 10, 3)  # 10 wide, 20 high
    assert upright[:8, :, 0].min() > 200 and upright[12:, :, 0].max() < 60  # the red half is now on top


@pytest.mark.parametrize("make, message", [
    (lambda p: truncated_jpeg(p), "truncated or corrupt image data"),
    (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
    (lambda p: p.write_text("this is a text file, not a JPEG"), "not a recognised image file"),
    (lambda p: png_claiming(p, 20_000, 20_000), r"refused by the decompression-bomb guard \(over 50,000,000 pixels"),
    (lambda p: png_claiming(p, 8_000, 8_000), r"refused by the decompression-bomb guard \(8000x8000 = 64,000,000"),
])
def test_bad_files_give_one_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: {message}"):
        read_rgb(path)
    facts = image_facts(path)
    assert facts["found"] and not facts["decodable"] and re.match(f"{re.escape(str(path))}: {message}", facts["error"])


def test_bomb_guard_refuses_before_allocating(tmp_path):
    path = png_claiming(tmp_path / "bomb.png", 20_000, 20_000)
    tracemalloc.start()
    started = time.perf_counter()
    facts = image_facts(path)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not facts["decodable"] and seconds < 1 and peak < 10_000_000  # 400 MB if it were decoded
    assert (facts["width"], facts["height"]) == (None, None) or facts["width"] == 20_000


def test_image_facts_from_one_read(tmp_path):
    path = tmp_path / "ok.png"
    Image.fromarray(noise(12)).save(path)
    facts = image_facts(path)
    assert facts == {"found": True, "decodable": True, "error": None, "mode": "RGB", "width": 12, "height": 12,
                     "bytes": path.stat().st_size, "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert image_facts(tmp_path / "nope.png")["error"] == f"{tmp_path / 'nope.png'}: file not found"


# --- the gate ---------------------------------------------------------------------------------

def make_dataset(root: Path) -> Path:
    """3 classes x 6 images, 8x8, in the modes the gate must accept (RGB, L, RGBA, palette, JPEG)."""
    for k, name in enumerate(("ant", "bee", "cow")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(noise(8, 10 * k + i)).save(root / name / f"{i}.png")
    Image.fromarray(noise(8, 99, channels=1)).save(root / "ant" / "gray.png")
    Image.fromarray(noise(8, 98, channels=4)).save(root / "bee" / "rgba.png")
    Image.fromarray(noise(8, 97)).convert("P").save(root / "cow" / "palette.png")
    Image.fromarray(noise(8, 96)).save(root / "cow" / "photo.jpg", quality=90)
    return root


def prepared(tmp_path: Path) -> tuple[Path, Path]:
    root = make_dataset(tmp_path / "data")
    prepare(PrepareParams(source="imagefolder", root=str(root), query_per_class=1, val_per_class=1), tmp_path / "p")
    return root, tmp_path / "p" / "manifest.parquet"


def test_gate_passes_on_good_data_and_writes_an_offline_report(tmp_path):
    root, manifest_path = prepared(tmp_path)
    summary = validate(ValidateParams(), manifest_path, tmp_path / "report")
    assert summary["success"] and summary["failed"] == 0 and summary["images"] == 22
    report = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert report["success"] and report["statistics"]["evaluated_validations"] == 1
    assert report["facts"]["modes"] == {"RGB": 19, "L": 1, "RGBA": 1, "P": 1}
    assert report["summary"]["fingerprint"] == Manifest.load(manifest_path).fingerprint()
    html = (tmp_path / "report" / "data_docs.html").read_text()
    assert "Expectation Validation Result" in html and "<style>" in html
    assert not re.search(r"<(script|link|img)\b[^>]*(src|href)=[\"']?https?://", html, re.I)
    assert "<script" not in html and "url('http" not in html
    assert require_passed(tmp_path / "report", summary["fingerprint"])["success"]
    with pytest.raises(UserError, match="gate passed on dataset .* not on 0000000000000000"):
        require_passed(tmp_path / "report", "0" * 64)


def test_gate_fails_on_bad_files_and_names_them(tmp_path):
    root, manifest_path = prepared(tmp_path)
    truncated_jpeg(root / "cow" / "photo.jpg")
    (root / "ant" / "1.png").write_bytes(b"")
    (root / "ant" / "2.png").write_text("text, not an image")
    png_claiming(root / "bee" / "1.png", 20_000, 20_000)
    (root / "bee" / "2.png").unlink()
    Image.fromarray(noise(8, 1234)).save(root / "cow" / "1.png")  # valid image, other content
    Image.fromarray(noise(40)).save(root / "cow" / "2.png")  # too big for max_side 32
    with pytest.raises(GateFailed) as failed:
        validate(ValidateParams(max_side=32), manifest_path, tmp_path / "report")
    message, details = str(failed.value), failed.value.details
    assert "\n" not in message and message.startswith("data gate failed: ")
    assert str(tmp_path / "report" / "validation.json") in message
    expected = {
        "every file exists inside the data root": ["bee/2.png: file not found"],
        "file content matches the recorded sha256": ["cow/photo.jpg", "ant/1.png", "ant/2.png", "cow/1.png"],
        "every file decodes as an image": ["cow/photo.jpg: truncated or corrupt image data", "ant/1.png: empty file",
                                           "ant/2.png: not a recognised image file",
                                           "bee/1.png: refused by the decompression-bomb guard"],
        "width within [8, 32] px": ["cow/2.png"],
    }
    for check, names in expected.items():
        block = details.split(f"x {check}")[1].split("  x ")[0]
        for name in names:
            assert name in block, (check, name, details)
    report = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert not report["success"] and report["facts"]["error_count"] == 5
    assert {f["check"] for f in report["failures"]} >= set(expected)
    assert (tmp_path / "report" / "data_docs.html").is_file()
    with pytest.raises(UserError, match="the data gate failed on this data"):
        require_passed(tmp_path / "report")


def test_gate_fails_on_bad_manifest_rows(tmp_path):
    root, manifest_path = prepared(tmp_path)
    manifest = Manifest.load(manifest_path)
    f = manifest.frame.copy()
    query = f.index[f["query"]][0]
    f.loc[query, "train"] = True  # a query that is also a training image
    val = f.index[f["val"]]
    f.loc[val[0], "train"] = True  # a validation image that is also a training image
    f.loc[val[1], "query"] = True  # ... and one that is also a query
    f.loc[f["path"] == "ant/3.png", "labels"] = "01"  # too short
    f.loc[f["path"] == "ant/4.png", "labels"] = "000"  # no label
    f.loc[f["labels"] == "001", "train"] = False  # class 'cow' has no training image left
    f = pd.concat([f, f.iloc[:1]], ignore_index=True)  # duplicate path
    Manifest(f, manifest.classes, manifest.info).save(manifest_path)
    with pytest.raises(GateFailed) as failed:
        validate(ValidateParams(), manifest_path, tmp_path / "report")
    details = failed.value.details
    for check, name in [("no query is a training image", f.loc[query, "path"]), ("paths are unique", f.loc[0, "path"]),
                        ("no validation image is a training image", f.loc[val[0], "path"]),
                        ("no query is a validation image", f.loc[val[1], "path"]),
                        ("every label string has one character per class (3)", "ant/3.png"),
                        ("every image has at least one label", "ant/4.png"),
                        ("class 'cow' has training images", "observed 0"), ("train has", "observed")]:
        assert name in details.split(f"x {check}")[1].split("  x ")[0], (check, name, details)


def test_gate_reports_symlinks_leaving_the_root(tmp_path):
    root, manifest_path = prepared(tmp_path)
    outside = tmp_path / "outside.png"
    Image.fromarray(noise(8)).save(outside)
    (root / "ant" / "0.png").unlink()
    (root / "ant" / "0.png").symlink_to(outside)
    with pytest.raises(GateFailed) as failed:
        validate(ValidateParams(), manifest_path, tmp_path / "report")
    assert re.search(r"ant/0.png: resolves to .*outside.png, outside the data root", failed.value.details)


def test_cli_exit_status_and_one_line_error(tmp_path):
    root, manifest_path = prepared(tmp_path)
    truncated_jpeg(root / "cow" / "photo.jpg")
    (tmp_path / "params.yaml").write_text("validate:\n  max_side: 64\n")
    result = subprocess.run([sys.executable, "-m", "adalabelhash.cli", "validate", "--params",
                             str(tmp_path / "params.yaml"), "--manifest", str(manifest_path), "--out",
                             str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: data gate failed: 2 of ") and "validation.json" in lines[-1]
    assert lines[0].startswith("data gate FAILED")
    assert "cow/photo.jpg: truncated or corrupt image data" in result.stderr
    assert (tmp_path / "report" / "data_docs.html").is_file()


def test_fact_pass_in_a_process_pool_matches_one_loop(tmp_path, monkeypatch):
    root, manifest_path = prepared(tmp_path)
    (root / "ant" / "1.png").write_bytes(b"")
    manifest = Manifest.load(manifest_path)
    serial = gather_facts(manifest, root, workers=1)
    monkeypatch.setattr(images, "POOL_MIN_ITEMS", 0)
    pooled = gather_facts(manifest, root, workers=2)
    assert pooled.equals(serial) and not serial["decodable"].all()


def test_validate_params_errors():
    from adalabelhash.params import parse_section

    with pytest.raises(UserError, match="params validate: need 1 <= min_side <= max_side"):
        parse_section(ValidateParams, {"min_side": 64, "max_side": 32}, "validate")
    with pytest.raises(UserError, match="size_mostly must be in"):
        parse_section(ValidateParams, {"size_mostly": 0}, "validate")
