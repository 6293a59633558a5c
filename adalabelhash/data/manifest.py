"""The manifest: one Parquet file that says which image files form the dataset and how.

Columns: `path` (POSIX, relative to the data root), `labels` (multi-hot as a '0'/'1' string of
width C), boolean `train`, `val`, `query`, `database`, and `sha256` of the file content.
Parquet key-value metadata: `classes` (JSON list; its order defines the label columns) and
`info` (JSON: source, protocol, seed, expected split sizes, the prepare params).

Loading checks the schema (columns, types, metadata) and refuses paths that leave the data
root lexically (`..`, absolute); `files()` also refuses symlinks that resolve outside it.
Content rules (unique paths, label widths, disjoint splits, hashes) are the data gate's job
(`adalabelhash validate`), which reports every offending row at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adalabelhash.data.paths import DataRoot, check_relative_path
from adalabelhash.errors import UserError
from adalabelhash.fileio import atomic_output

MANIFEST_NAME = "manifest.parquet"
SPLITS = ("train", "val", "query", "database")
STRING_COLUMNS = ("path", "labels", "sha256")
COLUMNS = ("path", "labels", *SPLITS, "sha256")
# Bump when the fingerprint's serialisation changes, so old and new versions never collide.
_FINGERPRINT_FORMAT = b"adalabelhash-manifest-v1\n"
_BIT = {True: "1", False: "0"}


class Manifest:
    """Rows of (path, labels, split flags, sha256) plus the class list and provenance info."""

    def __init__(self, frame: pd.DataFrame, classes: list[str], info: dict[str, Any] | None = None,
                 where: str = "manifest"):
        """`where` names the manifest in error messages (its file, when loaded)."""
        self.classes = _check_classes(classes, where)
        self.info = dict(info or {})
        self.frame = _check_frame(frame, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        import pyarrow.parquet as pq

        path = Path(path)
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise UserError(f"{path}: manifest not found (run `adalabelhash prepare`)") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise UserError(f"{path}: not a readable Parquet manifest ({exc})") from None
        metadata = table.schema.metadata or {}
        classes = _json_metadata(metadata, b"classes", path)
        info = _json_metadata(metadata, b"info", path)
        if not isinstance(info, dict):
            raise UserError(f"{path}: metadata 'info' must be a JSON object")
        return cls(table.to_pandas(), classes, info, where=str(path))

    def save(self, path: str | os.PathLike) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [(c, pa.string()) for c in ("path", "labels")] + [(s, pa.bool_()) for s in SPLITS]
            + [("sha256", pa.string())],
            metadata={b"classes": json.dumps(self.classes).encode(),
                      b"info": json.dumps(self.info, sort_keys=True).encode()},
        )
        table = pa.Table.from_pandas(self.frame, schema=schema, preserve_index=False)
        with atomic_output(path) as tmp:
            pq.write_table(table, tmp)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def mask(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        return self.frame[split].to_numpy(dtype=bool)

    def indices(self, split: str) -> np.ndarray:
        """Row numbers of `split`, in manifest order."""
        return np.flatnonzero(self.mask(split))

    def split_sizes(self) -> dict[str, int]:
        return {s: int(self.frame[s].sum()) for s in SPLITS}

    def _select(self, column: str, mask_or_split: str | np.ndarray | None) -> pd.Series:
        values = self.frame[column]
        if isinstance(mask_or_split, str):
            return values[self.mask(mask_or_split)]
        if mask_or_split is not None:
            return values[np.asarray(mask_or_split, dtype=bool)]
        return values

    def files(self, root: str | os.PathLike, mask_or_split: str | np.ndarray | None = None) -> list[str]:
        """Real paths of the rows' files under `root` (URLs under a URL root); a path resolving
        outside it is a UserError."""
        data_root = DataRoot(root)
        return [data_root.resolve(path) for path in self._select("path", mask_or_split)]

    def label_matrix(self, mask_or_split: str | np.ndarray | None = None) -> np.ndarray:
        """Multi-hot labels as uint8 (n, C) for all rows, a split name, or a boolean mask."""
        labels = self._select("labels", mask_or_split)
        width = self.num_classes
        bad = labels.isna() | (labels.str.len() != width) | ~labels.str.fullmatch("[01]*").fillna(False)
        if bad.any():
            row = bad.idxmax()
            raise UserError(f"manifest row {row} ({self.frame.at[row, 'path']}): labels {labels[row]!r} "
                            f"is not a 0/1 string of width {width}")
        bits = np.frombuffer("".join(labels).encode("ascii"), dtype=np.uint8) - ord("0")
        return bits.reshape(len(labels), width)

    def fingerprint(self) -> str:
        """sha256 over the classes and the sorted rows: the dataset version.

        Computed from values, not file bytes, so it is stable across Parquet writer versions and
        row order, and changes whenever a path, label, split flag or file hash changes.
        """
        f = self.frame.fillna({c: "" for c in STRING_COLUMNS})
        flags = f["train"].map(_BIT)
        for split in SPLITS[1:]:
            flags = flags + f[split].map(_BIT)
        lines = sorted(f["path"] + "\t" + f["labels"] + "\t" + flags + "\t" + f["sha256"])
        digest = hashlib.sha256(_FINGERPRINT_FORMAT)
        digest.update(json.dumps(self.classes).encode() + b"\n")
        digest.update("\n".join(lines).encode())
        return digest.hexdigest()


def _json_metadata(metadata: dict[bytes, bytes], key: bytes, path: Path) -> Any:
    if key not in metadata:
        raise UserError(f"{path}: Parquet metadata has no '{key.decode()}' entry (not written by prepare?)")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: metadata '{key.decode()}' is not valid JSON ({exc})") from None


def _check_classes(classes: Any, where: str) -> list[str]:
    if not isinstance(classes, list) or not classes:
        raise UserError(f"{where}: classes must be a non-empty list of names")
    if not all(isinstance(c, str) and c for c in classes):
        raise UserError(f"{where}: class names must be non-empty strings, got {classes!r}")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise UserError(f"{where}: duplicate class name(s) {', '.join(dupes)}")
    return list(classes)


def _check_frame(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in frame.columns]
    extra = [c for c in frame.columns if c not in COLUMNS]
    if missing or extra:
        raise UserError(f"{where}: manifest columns must be {', '.join(COLUMNS)}"
                        + (f"; missing {', '.join(missing)}" if missing else "")
                        + (f"; unexpected {', '.join(map(str, extra))}" if extra else ""))
    frame = frame.loc[:, list(COLUMNS)].reset_index(drop=True)
    for column in STRING_COLUMNS:
        values = frame[column]
        if not values.map(lambda v: isinstance(v, str) or v is None or v != v).all():
            raise UserError(f"{where}: column '{column}' must hold strings")
        frame[column] = values.astype("str")
    for split in SPLITS:
        if not pd.api.types.is_bool_dtype(frame[split]):
            raise UserError(f"{where}: column '{split}' must be boolean without nulls, "
                            f"got {frame[split].dtype}")
    for row, path in frame["path"].items():
        if isinstance(path, str):
            check_relative_path(path, f"{where} row {row}")
    return frame
