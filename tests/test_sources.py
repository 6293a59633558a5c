"""Sources and `prepare`: deterministic digits, CIFAR-10 protocols, imagefolder and list files."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adalabelhash.data import sources
from adalabelhash.data.fetch import write_class_tree
from adalabelhash.data.manifest import Manifest
from adalabelhash.errors import UserError
from adalabelhash.params import parse_section
from components.get_data import get_data
from components.prepare import PrepareParams, prepare


def write_image(path: Path, seed: int, size: int = 4, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)


def make_cifar_tree(root: Path, train: int = 8, test: int = 3) -> Path:
    for k, name in enumerate(sources.CIFAR10_CLASSES):
        for i in range(train):
            write_image(root / "train" / name / f"{i:04d}.jpg", 1000 * k + i)
        for i in range(test):
            write_image(root / "test" / name / f"{i:04d}.jpg", 1000 * k + 500 + i)
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def check_split_rules(manifest: Manifest) -> None:
    f = manifest.frame
    assert not (f["query"] & f["train"]).any() and not (f["query"] & f["val"]).any()
    assert not (f["val"] & f["train"]).any()
    assert manifest.split_sizes() == manifest.info["sizes"]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "data" / "digits"
    get_data("digits", root)
    return root


def test_digits_get_data_is_byte_for_byte_deterministic(digits_root, tmp_path):
    again = tmp_path / "digits"
    summary = get_data("digits", again)
    assert summary["images"] == 1797
    first, second = tree_hashes(digits_root), tree_hashes(again)
    assert first == second and len(first) == 1797
    assert sorted(p.name for p in digits_root.iterdir()) == [str(d) for d in range(10)]
    with Image.open(digits_root / "0" / "0000.png") as image:
        assert image.mode == "L" and image.size == (8, 8)
    values = np.unique([np.asarray(Image.open(p)) for p in sorted(digits_root.glob("*/00[0-4]*.png"))])
    assert set(values) <= {round(v * 255 / 16) for v in range(17)} and values[0] == 0 and values[-1] == 255


def test_prepare_digits_default_splits_are_seeded_and_disjoint(digits_root, tmp_path):
    params = PrepareParams(root=str(digits_root))
    summary = prepare(params, tmp_path / "a")
    manifest = Manifest.load(tmp_path / "a" / "manifest.parquet")
    assert summary["sizes"] == {"train": 1797 - 300, "val": 100, "query": 200, "database": 1597}
    check_split_rules(manifest)
    assert (manifest.label_matrix("query").sum(axis=0) == 20).all()
    assert manifest.frame["sha256"].str.fullmatch("[0-9a-f]{64}").all()
    assert manifest.info["seed"] == 0 and manifest.info["params"]["query_per_class"] is None
    assert prepare(params, tmp_path / "b")["fingerprint"] == summary["fingerprint"]
    reseeded = prepare(PrepareParams(root=str(digits_root), seed=1), tmp_path / "c")
    assert reseeded["fingerprint"] != summary["fingerprint"]


def test_imagefolder_class_errors_name_the_folder(tmp_path):
    for name in ("a", "b", "c"):
        for i in range(4):
            write_image(tmp_path / name / f"{i}.png", i)
    with pytest.raises(UserError, match="class 'a' has 4 images; query_per_class=3"):
        sources.imagefolder_draft(tmp_path, None, 3, 1, "rest", seed=0)
    with pytest.raises(UserError, match=r"/c: class directory 'c' is not in the class list \(a, b\)"):
        sources.scan_imagefolder(tmp_path, classes=["a", "b"])
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match=r"/d: class 'd' has no images"):
        sources.scan_imagefolder(tmp_path)
    (tmp_path / "d" / "notes.txt").write_text("not an image extension: ignored")
    with pytest.raises(UserError, match="class 'd' has no images"):
        sources.scan_imagefolder(tmp_path)


def test_cifar10_protocols_on_a_tiny_tree(tmp_path):
    root = make_cifar_tree(tmp_path / "cifar10")
    one = sources.cifar10_draft(root, "I", val_per_class=1, seed=0, query_per_class=2, train_per_class=5)
    assert one.expected == {"train": 40, "val": 10, "query": 20, "database": 90}
    assert one.frame[["train", "val", "query", "database"]].sum().to_dict() == one.expected
    assert not one.info["official_counts"]
    f = one.frame
    assert f.loc[f["train"] | f["val"], "database"].all() and not f.loc[f["query"], "database"].any()

    two = sources.cifar10_draft(root, "II", val_per_class=2, seed=0)
    assert two.expected == {"train": 60, "val": 20, "query": 30, "database": 80}
    f = two.frame
    assert f[["train", "val", "query", "database"]].sum().to_dict() == two.expected
    assert f.loc[f["query"], "path"].str.startswith("test/").all()
    assert f.loc[f["database"], "path"].str.startswith("train/").all()

    (root / "train" / "unicorn").mkdir()
    with pytest.raises(UserError, match="train/unicorn: class directory 'unicorn' is not in the class list"):
        sources.cifar10_draft(root, "II", val_per_class=2, seed=0)


def make_tarball(path: Path, tree: Path, prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in ("train", "test"):
            tar.add(tree / name, arcname=f"{prefix}{name}")
    return path


def test_cifar10_get_data_from_a_tarball_then_prepare(tmp_path):
    tree = make_cifar_tree(tmp_path / "tree")
    for prefix in ("", "CIFAR-10-images/"):  # a single wrapping folder is lifted
        tarball = make_tarball(tmp_path / "c.tar.gz", tree, prefix)
        out = tmp_path / "data" / "cifar10"
        summary = get_data("cifar10", out, tarball)
        assert summary["images"] == 110 and tree_hashes(out) == tree_hashes(tree)
    params = parse_section(PrepareParams, {"source": "cifar10", "root": str(out), "protocol": "II",
                                           "val_per_class": 1}, "prepare")
    summary = prepare(params, tmp_path / "prepared")
    assert summary["sizes"] == {"train": 70, "val": 10, "query": 30, "database": 80}
    check_split_rules(Manifest.load(tmp_path / "prepared" / "manifest.parquet"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_tarball_members_are_refused_before_anything_is_written(tmp_path, kind):
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("train/cat/0.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        bad = tarfile.TarInfo({"dotdot": "train/../../evil.jpg", "absolute": "/tmp/evil.jpg",
                               "symlink": "train/cat/link.jpg"}[kind])
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            bad.size = 3
        tar.addfile(bad, io.BytesIO(b"abc"))
    message = "is a link or special file" if kind == "symlink" else "would be written outside the target"
    with pytest.raises(UserError, match=f"evil.tar.gz: member .* {message}"):
        get_data("cifar10", tmp_path / "out", tarball)
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.jpg").exists()


def test_write_class_tree_numbers_images_per_class(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    write_class_tree(tmp_path, images, [1, 0, 1, 1, 0], ("airplane", "automobile"))
    assert tree_hashes(tmp_path).keys() == {"airplane/0000.png", "airplane/0001.png", "automobile/0000.png",
                                            "automobile/0001.png", "automobile/0002.png"}
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "automobile" / "0002.png")), images[3])


def write_lists(root: Path, lines: dict[str, list[str]], classes: list[str] | None = None) -> dict[str, str]:
    for split, entries in lines.items():
        (root / f"{split}.txt").write_text("\n".join(entries) + "\n")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return {split: str(root / f"{split}.txt") for split in lines}


def test_listfile_multi_label_rows_are_merged_and_val_is_carved_from_train(tmp_path):
    for i in range(10):
        write_image(tmp_path / "img" / f"{i}.jpg", i)
    train = [f"img/{i}.jpg {i % 2} 1 {int(i > 3)}" for i in range(6)]
    lists = write_lists(tmp_path, {"train": train, "query": ["./img/8.jpg 0 0 1", "img/9.jpg 1 0 0"],
                                   "database": train + ["img/6.jpg 1 1 1", "img/7.jpg 0 1 0"]}, ["sky", "sea", "car"])
    params = parse_section(PrepareParams, {"source": "listfile", "root": str(tmp_path), "list_files": lists,
                                           "class_names": str(tmp_path / "classes.txt"), "val_size": 2}, "prepare")
    summary = prepare(params, tmp_path / "prepared")
    manifest = Manifest.load(tmp_path / "prepared" / "manifest.parquet")
    assert manifest.classes == ["sky", "sea", "car"] and len(manifest) == 10
    assert summary["sizes"] == {"train": 4, "val": 2, "query": 2, "database": 8}
    check_split_rules(manifest)
    row = manifest.frame.set_index("path").loc["img/5.jpg"]
    assert row["labels"] == "111" and row["database"]
    # without a class-names file the width comes from the first line; val defaults to val_per_class x C
    draft = sources.listfile_draft(lists, None, seed=0, val_per_class=1)
    assert draft.classes == ["class_0", "class_1", "class_2"] and draft.expected["val"] == 3


@pytest.mark.parametrize("bad_line, message", [
    ("img/1.jpg 0 1 0 1", r"train.txt:2: img/1.jpg has 4 label columns, expected 3"),
    ("img/1.jpg 0 2 0", r"train.txt:2: img/1.jpg has labels 0 2 0; each must be 0 or 1"),
    ("../img/1.jpg 0 1 0", r"train.txt:2: path '../img/1.jpg' contains '..'"),
    ("img/0.jpg 0 1 0", r"train.txt:2: duplicate path img/0.jpg \(also at .*train.txt:1\)"),
])
def test_listfile_errors_name_file_and_line(tmp_path, bad_line, message):
    lists = write_lists(tmp_path, {"train": ["img/0.jpg 1 0 0", bad_line], "query": ["img/2.jpg 0 0 1"],
                                   "database": ["img/0.jpg 1 0 0"]})
    with pytest.raises(UserError, match=message):
        sources.listfile_draft(lists, None, seed=0, val_size=0)


def test_listfile_conflicting_labels_and_class_count(tmp_path):
    lists = write_lists(tmp_path, {"train": ["img/0.jpg 1 0 0"], "query": ["img/2.jpg 0 0 1"],
                                   "database": ["img/0.jpg 0 1 0"]}, ["a", "b"])
    with pytest.raises(UserError, match=r"train.txt:1: img/0.jpg has 3 label columns, expected 2"):
        sources.listfile_draft(lists, str(tmp_path / "classes.txt"), seed=0, val_size=0)
    with pytest.raises(UserError, match=r"database.txt:1: img/0.jpg has labels 010, but .*train.txt:1 gives 100"):
        sources.listfile_draft(lists, None, seed=0, val_size=0)


@pytest.mark.parametrize("values, message", [
    ({"source": "digits", "protocol": "I"}, "protocol do\\(es\\) not apply to source digits"),
    ({"source": "cifar10", "root": "data/cifar10"}, "source cifar10 needs protocol: I or II"),
    ({"source": "cifar10", "protocol": "II", "query_per_class": 5}, "splits of protocol II are given"),
    ({"source": "listfile", "list_files": {"train": "t"}}, "list_files with exactly the keys"),
    ({"val_per_class": -1}, "val_per_class must be >= 0"),
    ({"train_per_class": "all"}, "train_per_class: expected int, got 'all'"),
])
def test_prepare_params_errors(values, message):
    with pytest.raises(UserError, match=f"params prepare.*{message}"):
        parse_section(PrepareParams, values, "prepare")


@pytest.mark.data
def test_real_cifar10_tarball_gives_the_standard_protocol_sizes(cifar_tarball):
    """On the real file names (listed, not extracted: writing 60,000 files is the slow part;
    benchmarks/validate_speed runs the real extraction)."""
    listing: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    with tarfile.open(cifar_tarball) as tar:
        for member in tar:
            split, name = member.name.split("/")[:2] if member.isfile() else (None, None)
            if split:
                listing[split].setdefault(name, []).append(member.name)
    train, test = ({c: sorted(v) for c, v in listing[s].items()} for s in ("train", "test"))
    assert sorted(train) == sorted(test) == sorted(sources.CIFAR10_CLASSES)
    one = sources.cifar10_split(train, test, "I", val_per_class=50, seed=0)
    assert one.info["official_counts"]
    assert one.expected == {"train": 4500, "val": 500, "query": 1000, "database": 59_000}
    assert one.frame[["train", "val", "query", "database"]].sum().to_dict() == one.expected
    assert (one.frame.loc[one.frame["query"], "labels"].value_counts() == 100).all()
    two = sources.cifar10_split(train, test, "II", val_per_class=100, seed=0)
    assert two.expected == {"train": 49_000, "val": 1000, "query": 10_000, "database": 50_000}
    assert two.frame[["train", "val", "query", "database"]].sum().to_dict() == two.expected


def test_listfile_unlabeled_lines_dropped_and_counted_or_refused(tmp_path):
    lists = write_lists(tmp_path, {"train": ["img/0.jpg 1 0", "img/1.jpg 0 0", "img/2.jpg 0 1"],
                                   "query": ["img/3.jpg 0 0", "img/4.jpg 1 1"], "database": ["img/0.jpg 1 0"]})
    draft = sources.listfile_draft(lists, None, seed=0, val_size=0)
    assert draft.info["unlabeled_dropped"] == {"train": 1, "query": 1, "database": 0}
    assert sorted(draft.frame["path"]) == ["img/0.jpg", "img/2.jpg", "img/4.jpg"]
    assert draft.expected == {"train": 2, "val": 0, "query": 1, "database": 1}
    with pytest.raises(UserError, match=r"train.txt:2: img/1.jpg has no label \(1 such line\(s\) in this file\)"):
        sources.listfile_draft(lists, None, seed=0, val_size=0, unlabeled="refuse")


def test_listfile_outside_the_data_root_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    lists = write_lists(tmp_path, {"train": ["img/0.jpg 1 0"], "query": ["img/1.jpg 0 1"], "database": ["img/0.jpg 1 0"]})
    params = parse_section(PrepareParams, {"source": "listfile", "root": str(tmp_path / "data"), "list_files": lists,
                                           "val_size": 0}, "prepare")
    with pytest.raises(UserError, match=r"train.txt: list files must be under prepare.root"):
        prepare(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
