"""Turn a raw image source into manifest rows: paths, labels and seeded splits.

Every source returns a `Draft`: the rows (not yet hashed), the class list, the split sizes the
protocol promises (computed arithmetically, independently of the row flags, so the data gate
can compare the two) and provenance. Rules shared by all sources:

- `val` is carved from the training pool, never from the queries: val and train are disjoint,
  and the database is untouched by the carving (it is the retrieval set of the protocol).
- Draws are seeded per class with (seed, crc32(class name)), over the file list sorted by
  path, so adding a class or listing files in another order leaves the other draws unchanged.
"""

from __future__ import annotations

import posixpath
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adalabelhash.data.images import IMAGE_EXTENSIONS
from adalabelhash.data.manifest import SPLITS
from adalabelhash.data.paths import check_relative_path, is_url, join, read_bytes, require_directory, url_filesystem
from adalabelhash.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_OFFICIAL = {"train": 5000, "test": 1000}  # images per class in the official release
LIST_SPLITS = ("train", "query", "database")


@dataclass
class Draft:
    frame: pd.DataFrame  # path, labels and the four split flags, sorted by path
    classes: list[str]
    expected: dict[str, int]  # split sizes the protocol promises
    info: dict[str, Any] = field(default_factory=dict)


def one_hot(index: int, width: int) -> str:
    return "0" * index + "1" + "0" * (width - index - 1)


def scan_imagefolder(root: str | Path, sub: str = "", classes: list[str] | tuple[str, ...] | None = None,
                     ) -> dict[str, list[str]]:
    """{class: sorted image paths relative to `root`} for `root/sub/<class>/**/<image>`.

    `root` is a directory or a URL (listed with its fsspec filesystem, by the same rules).
    Without `classes` the class list is the sorted directory names; with it, a directory not in
    the list and a listed class without images are errors (both silently shift label columns).
    """
    base = join(root, sub)
    require_directory(base, "image folder", "" if is_url(root) else " (materialise the source with `adalabelhash get-data`)")
    tree = _UrlTree(root) if is_url(root) else _LocalTree(root)
    dirs = sorted(name for name in tree.folders(sub) if not name.startswith("."))
    if classes is None:
        classes = dirs
    unknown = [d for d in dirs if d not in classes]
    if unknown:
        raise UserError(f"{join(base, unknown[0])}: class directory '{unknown[0]}' is not in the class list "
                        f"({', '.join(classes)})")
    if not classes:
        raise UserError(f"{base}: no class directories (expected {base}/<class>/<image>)")
    found = {}
    for name in classes:
        files = sorted(path for path in tree.files(posixpath.join(sub, name))
                       if posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS
                       and not posixpath.basename(path).startswith("."))
        if not files:
            raise UserError(f"{join(base, name)}: class '{name}' has no images ({'/'.join(IMAGE_EXTENSIONS)})")
        found[name] = files
    return found


class _LocalTree:
    """Folder names and files (POSIX paths relative to the root, recursively) of a local tree."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folders(self, sub: str) -> list[str]:
        return [d.name for d in (self.root / sub).iterdir() if d.is_dir()]

    def files(self, sub: str) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in (self.root / sub).rglob("*") if p.is_file()]


class _UrlTree:
    """The same listing under a URL, through its fsspec filesystem (prefixes are its folders)."""

    def __init__(self, root: str):
        self.fs, self.path = url_filesystem(root)
        self.path = self.path.rstrip("/")

    def folders(self, sub: str) -> list[str]:
        return [posixpath.basename(entry["name"].rstrip("/"))
                for entry in self.fs.ls(posixpath.join(self.path, sub), detail=True) if entry["type"] == "directory"]

    def files(self, sub: str) -> list[str]:
        try:
            found = self.fs.find(posixpath.join(self.path, sub))
        except FileNotFoundError:
            return []
        return [name[len(self.path) + 1:] for name in found]


def _class_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _rows(paths: list[str], label: str, **flags: bool) -> list[tuple]:
    return [(p, label, *(flags.get(s, False) for s in SPLITS)) for p in paths]


def _frame(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["path", "labels", *SPLITS])
    return frame.sort_values("path", ignore_index=True)


def per_class_draft(files: dict[str, list[str]], query_per_class: int, val_per_class: int,
                    train_per_class: int | str, seed: int) -> Draft:
    """Per class: draw queries, then the training pool (a count or "rest"), carve val from the pool.

    Database = every image that is not a query (so train and val are in the database).
    """
    classes = list(files)
    width = len(classes)
    rows, pool_total = [], 0
    for k, name in enumerate(classes):
        paths = files[name]
        pool = len(paths) - query_per_class if train_per_class == "rest" else train_per_class
        need = query_per_class + max(pool, val_per_class + 1)
        if len(paths) < need or pool <= val_per_class:
            raise UserError(f"class '{name}' has {len(paths)} images; query_per_class={query_per_class}, "
                            f"val_per_class={val_per_class}, train_per_class={train_per_class} need at least "
                            f"{need} (and at least one training image left after val)")
        order = [paths[i] for i in _class_rng(seed, name).permutation(len(paths))]
        label = one_hot(k, width)
        query, val = order[:query_per_class], order[query_per_class:query_per_class + val_per_class]
        train = order[query_per_class + val_per_class:query_per_class + pool]
        rest = order[query_per_class + pool:]
        rows += _rows(query, label, query=True)
        rows += _rows(val, label, val=True, database=True)
        rows += _rows(train, label, train=True, database=True)
        rows += _rows(rest, label, database=True)
        pool_total += pool
    total = sum(map(len, files.values()))
    expected = {"train": pool_total - val_per_class * width, "val": val_per_class * width,
                "query": query_per_class * width, "database": total - query_per_class * width}
    return Draft(_frame(rows), classes, expected)


def imagefolder_draft(root: str | Path, classes: list[str] | tuple[str, ...] | None, query_per_class: int,
                      val_per_class: int, train_per_class: int | str, seed: int) -> Draft:
    files = scan_imagefolder(root, classes=classes)
    return per_class_draft(files, query_per_class, val_per_class, train_per_class, seed)


def cifar10_draft(root: str | Path, protocol: str, val_per_class: int, seed: int,
                  query_per_class: int = 100, train_per_class: int = 500) -> Draft:
    """The CIFAR-10 protocols (see `cifar10_split`) on the `train/<class>`, `test/<class>` tree."""
    train = scan_imagefolder(root, "train", CIFAR10_CLASSES)
    test = scan_imagefolder(root, "test", CIFAR10_CLASSES)
    return cifar10_split(train, test, protocol, val_per_class, seed, query_per_class, train_per_class)


def cifar10_split(train: dict[str, list[str]], test: dict[str, list[str]], protocol: str, val_per_class: int,
                  seed: int, query_per_class: int = 100, train_per_class: int = 500) -> Draft:
    """{class: paths} of the official train and test sets -> the protocol's splits.

    I: from all images, per class `query_per_class` queries and `train_per_class` training images
       (val carved from those); everything that is not a query is the database.
    II: the official test set is the query set; the official training set is the training pool
       (val carved from it) and the whole of it is the database.
    """
    counts = {"train": sum(map(len, train.values())), "test": sum(map(len, test.values()))}
    official = all(len(train[c]) == CIFAR10_OFFICIAL["train"] and len(test[c]) == CIFAR10_OFFICIAL["test"]
                   for c in CIFAR10_CLASSES)
    info = {"protocol": protocol, "files": counts, "official_counts": official}
    if protocol == "I":
        both = {c: train[c] + test[c] for c in CIFAR10_CLASSES}
        draft = per_class_draft(both, query_per_class, val_per_class, train_per_class, seed)
        draft.info = info
        return draft
    width = len(CIFAR10_CLASSES)
    rows = []
    for k, name in enumerate(CIFAR10_CLASSES):
        if len(train[name]) <= val_per_class:
            raise UserError(f"class '{name}' has {len(train[name])} training images; val_per_class={val_per_class} "
                            f"would leave none")
        order = [train[name][i] for i in _class_rng(seed, name).permutation(len(train[name]))]
        label = one_hot(k, width)
        rows += _rows(test[name], label, query=True)
        rows += _rows(order[:val_per_class], label, val=True, database=True)
        rows += _rows(order[val_per_class:], label, train=True, database=True)
    expected = {"train": counts["train"] - val_per_class * width, "val": val_per_class * width,
                "query": counts["test"], "database": counts["train"]}
    return Draft(_frame(rows), list(CIFAR10_CLASSES), expected, info)


def _read_text(path: str | Path, what: str) -> str:
    """A small text file, local or at a URL; missing or unreadable is one error naming it."""
    try:
        return read_bytes(path).decode()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_list_file(path: str | Path, width: int | None) -> list[tuple[str, str, int]]:
    """DeepHash-pytorch list lines `relative/path.jpg 0 1 0 ...` -> (path, label string, line number).

    `path` is a local file or a URL (next to the images in a bucket).
    `width` None takes the width from the first line; every line must then agree.
    """
    lines = _read_text(path, "list file").splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{number}"
        rel = parts[0][2:] if parts[0].startswith("./") else parts[0]
        check_relative_path(rel, where)
        bits = parts[1:]
        if width is None:
            width = len(bits)
        if len(bits) != width:
            raise UserError(f"{where}: {rel} has {len(bits)} label columns, expected {width} (one per class)")
        if any(b not in ("0", "1") for b in bits):
            raise UserError(f"{where}: {rel} has labels {' '.join(bits)}; each must be 0 or 1")
        entries.append((rel, "".join(bits), number))
    if not entries:
        raise UserError(f"{path}: list file has no entries")
    return entries


def listfile_draft(list_files: dict[str, str], class_names: str | None, seed: int, val_size: int | None = None,
                   val_per_class: int = 10, unlabeled: str = "drop") -> Draft:
    """Multi-label lists, one per split (train, query, database); a path in several lists is one row.

    `val_size` train images (None: `val_per_class` x the number of classes) become val.
    Lines whose labels are all 0 (NUS-WIDE and MS-COCO lists have them): `unlabeled: drop` leaves
    them out and counts them per split in the info (the usual protocols keep the images with at
    least one of the chosen labels); `refuse` makes them an error.
    """
    classes = None
    if class_names:
        classes = [line.strip() for line in _read_text(class_names, "class names file").splitlines() if line.strip()]
    width = len(classes) if classes else None
    rows: dict[str, dict[str, Any]] = {}
    counts, dropped = {}, {}
    for split in LIST_SPLITS:
        entries = read_list_file(list_files[split], width)
        width = width or len(entries[0][1])
        empty = [(rel, number) for rel, labels, number in entries if "1" not in labels]
        if empty and unlabeled == "refuse":
            rel, number = empty[0]
            raise UserError(f"{list_files[split]}:{number}: {rel} has no label ({len(empty)} such line(s) in this file); "
                            f"set prepare.unlabeled: drop to leave them out")
        dropped[split] = len(empty)
        entries = [entry for entry in entries if "1" in entry[1]]
        if not entries:
            raise UserError(f"{list_files[split]}: every line has no label")
        counts[split] = len(entries)
        for rel, labels, number in entries:
            where = f"{list_files[split]}:{number}"
            row = rows.setdefault(rel, {"labels": labels, "where": where})
            if row.get(split):
                raise UserError(f"{where}: duplicate path {rel} (also at {row[split]})")
            if row["labels"] != labels:
                raise UserError(f"{where}: {rel} has labels {labels}, but {row['where']} gives {row['labels']}")
            row[split] = where
    classes = classes or [f"class_{i}" for i in range(width)]
    if val_size is None:
        val_size = val_per_class * len(classes)
    train_paths = sorted(p for p, r in rows.items() if r.get("train"))
    if val_size >= len(train_paths):
        raise UserError(f"val_size={val_size} must be smaller than the {len(train_paths)} training images")
    val = {train_paths[i] for i in np.random.default_rng(seed).choice(len(train_paths), val_size, replace=False)}
    frame = _frame([(p, r["labels"], bool(r.get("train")) and p not in val, p in val, bool(r.get("query")),
                     bool(r.get("database"))) for p, r in rows.items()])
    expected = {"train": counts["train"] - val_size, "val": val_size, "query": counts["query"],
                "database": counts["database"]}
    return Draft(frame, classes, expected, {"files": counts, "unlabeled_dropped": dropped})
