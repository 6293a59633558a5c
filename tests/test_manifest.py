"""The manifest file: round trip, fingerprint, label matrix, schema errors, path safety."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adalabelhash.data.manifest import Manifest
from adalabelhash.data.paths import DataRoot, check_relative_path
from adalabelhash.errors import UserError

CLASSES = ["cat", "dog", "fish"]


def make_frame(**overrides) -> pd.DataFrame:
    frame = pd.DataFrame({
        "path": ["cat/0.png", "dog/1.png", "fish/2.png", "cat/3.png"],
        "labels": ["100", "010", "001", "101"],
        "train": [True, True, False, False],
        "val": [False, False, False, True],
        "query": [False, False, True, False],
        "database": [True, True, False, True],
        "sha256": ["a" * 64, "b" * 64, "c" * 64, "d" * 64],
    })
    for column, values in overrides.items():
        frame[column] = values
    return frame


def test_round_trip_keeps_rows_classes_info_and_fingerprint(tmp_path):
    manifest = Manifest(make_frame(), CLASSES, {"source": "test", "sizes": {"train": 2}})
    manifest.save(tmp_path / "manifest.parquet")
    loaded = Manifest.load(tmp_path / "manifest.parquet")
    pd.testing.assert_frame_equal(loaded.frame, manifest.frame)
    assert loaded.classes == CLASSES and loaded.info == {"source": "test", "sizes": {"train": 2}}
    assert loaded.fingerprint() == manifest.fingerprint()
    metadata = pq.read_schema(tmp_path / "manifest.parquet").metadata
    assert json.loads(metadata[b"classes"]) == CLASSES
    assert [name for name in pq.read_schema(tmp_path / "manifest.parquet").names] == list(manifest.frame.columns)


def test_fingerprint_ignores_row_order_but_sees_every_value():
    base = Manifest(make_frame(), CLASSES).fingerprint()
    assert Manifest(make_frame().iloc[::-1], CLASSES).fingerprint() == base
    assert Manifest(make_frame(), CLASSES, {"other": "info"}).fingerprint() == base
    changed = [
        make_frame(labels=["100", "010", "001", "100"]),
        make_frame(val=[False, False, False, False]),
        make_frame(sha256=["a" * 64, "b" * 64, "c" * 64, "e" * 64]),
        make_frame(path=["cat/0.png", "dog/1.png", "fish/2.png", "cat/4.png"]),
    ]
    assert all(Manifest(frame, CLASSES).fingerprint() != base for frame in changed)
    assert Manifest(make_frame(), ["cat", "dog", "bird"]).fingerprint() != base


def test_label_matrix_and_indices():
    manifest = Manifest(make_frame(), CLASSES)
    all_labels = manifest.label_matrix()
    assert all_labels.dtype == np.uint8 and all_labels.shape == (4, 3)
    np.testing.assert_array_equal(all_labels[3], [1, 0, 1])
    np.testing.assert_array_equal(manifest.label_matrix("query"), [[0, 0, 1]])
    np.testing.assert_array_equal(manifest.label_matrix(np.array([True, False, False, True])), [[1, 0, 0], [1, 0, 1]])
    np.testing.assert_array_equal(manifest.indices("database"), [0, 1, 3])
    assert manifest.split_sizes() == {"train": 2, "val": 1, "query": 1, "database": 3}
    with pytest.raises(UserError, match="unknown split 'test'"):
        manifest.indices("test")


def test_label_matrix_names_the_bad_row():
    manifest = Manifest(make_frame(labels=["100", "01", "001", "101"]), CLASSES)
    with pytest.raises(UserError, match=r"row 1 \(dog/1.png\): labels '01' is not a 0/1 string of width 3"):
        manifest.label_matrix()


@pytest.mark.parametrize("path, message", [
    ("../outside.png", "contains '..'"),
    ("cat/../../outside.png", "contains '..'"),
    ("/etc/passwd", "is absolute"),
    ("cat/./0.png", "not normalised"),
    ("cat\\0.png", "must use '/'"),
])
def test_paths_that_could_escape_the_root_are_refused_at_load(tmp_path, path, message):
    frame = make_frame(path=["cat/0.png", path, "fish/2.png", "cat/3.png"])
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(
        {b"classes": json.dumps(CLASSES).encode(), b"info": b"{}"})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(UserError, match=f"m.parquet row 1: path .* {message}"):
        Manifest.load(tmp_path / "m.parquet")


def test_schema_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="manifest not found"):
        Manifest.load(tmp_path / "missing.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet manifest"):
        Manifest.load(tmp_path / "text.parquet")
    pq.write_table(pa.Table.from_pandas(make_frame(), preserve_index=False), tmp_path / "nometa.parquet")
    with pytest.raises(UserError, match="no 'classes' entry"):
        Manifest.load(tmp_path / "nometa.parquet")
    with pytest.raises(UserError, match="missing sha256"):
        Manifest(make_frame().drop(columns="sha256"), CLASSES)
    with pytest.raises(UserError, match="column 'train' must be boolean"):
        Manifest(make_frame(train=[1, 0, 0, 0]), CLASSES)
    with pytest.raises(UserError, match="duplicate class name"):
        Manifest(make_frame(), ["cat", "cat", "fish"])


def test_data_root_refuses_symlinks_that_leave_it(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "cat").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "cat" / "real.png").write_bytes(b"x")
    os.symlink(outside / "secret.png", root / "cat" / "escape.png")
    os.symlink(root / "cat" / "real.png", root / "cat" / "inside.png")
    os.symlink(outside, root / "linked_dir")
    data_root = DataRoot(root)
    assert data_root.resolve("cat/inside.png") == str((root / "cat" / "real.png").resolve())
    for path in ("cat/escape.png", "linked_dir/secret.png"):
        with pytest.raises(UserError, match=f"{path}: resolves to .*outside the data root"):
            data_root.resolve(path)
    with pytest.raises(UserError, match="contains '..'"):
        check_relative_path("cat/../../x", "where")
    frame = make_frame(path=["cat/real.png", "cat/inside.png", "cat/escape.png", "cat/real.png"])
    manifest = Manifest(frame, CLASSES)
    assert manifest.files(root, "train") == [str((root / "cat" / "real.png").resolve())] * 2
    with pytest.raises(UserError, match="cat/escape.png: resolves to"):
        manifest.files(root)
