"""The encoded database: the codes one encoder produced, as a unit with that encoder.

Codes of one model version cannot be compared with codes of another, so `evaluate` logs the
database into the MLflow run that the registered model version points at (artifact path
`database/`), and `serve` loads encoder and database from that run and nothing else:

  database/codes.npz      ids    int64 (n,)      manifest row ids of the database items
                          codes  uint8 (n, K/8)  packed bits (adalabelhash.codes), row i <-> ids[i]
  database/items.parquet  id, path (relative to the data root), labels (list of class names)
  database/database.json  format, bits, count, classes, dataset_fingerprint

Both data files are columnar and load in one read each (1M items: codes.npz 8 MB at 64 bits).
Only database items are in it, not the queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adalabelhash.errors import UserError

ARTIFACT_PATH = "database"
FORMAT = 1


@dataclass(frozen=True)
class Database:
    ids: np.ndarray  # int64 (n,): manifest row ids
    codes: np.ndarray  # uint8 (n, K/8): packed bits
    paths: list[str]  # relative to the data root
    labels: list[str]  # class names of each item, comma-joined (multi-label: several)
    classes: list[str]
    dataset_fingerprint: str

    @property
    def bits(self) -> int:
        return 8 * self.codes.shape[1]

    def __len__(self) -> int:
        return len(self.ids)


def database_from_encoded(encoded_dir: Path, manifest_path: Path) -> Database:
    """The database items of an encode output, with their paths and labels from the manifest."""
    from adalabelhash.data.manifest import Manifest
    from components.encode import load_encoded

    manifest = Manifest.load(manifest_path)
    ids, codes = load_encoded(encoded_dir)
    keep = manifest.frame["database"].to_numpy()[ids]
    ids, codes = ids[keep], codes[keep]
    labels = manifest.label_matrix()[ids]
    names = [",".join(manifest.classes[c] for c in np.flatnonzero(row)) for row in labels]
    return Database(ids.astype(np.int64), codes, manifest.frame["path"].to_numpy()[ids].tolist(), names,
                    list(manifest.classes), manifest.fingerprint())


def write_database(database: Database, out_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adalabelhash.fileio import atomic_directory, write_json

    with atomic_directory(out_dir) as tmp:
        np.savez(tmp / "codes.npz", ids=database.ids, codes=database.codes)
        table = pa.table({"id": database.ids, "path": database.paths,
                          "labels": [label.split(",") if label else [] for label in database.labels]})
        pq.write_table(table, tmp / "items.parquet")
        write_json(tmp / "database.json", {"format": FORMAT, "bits": database.bits, "count": len(database),
                                           "classes": database.classes,
                                           "dataset_fingerprint": database.dataset_fingerprint})


def load_database(directory: Path) -> Database:
    """Read and check a `database/` directory: every file present, one row per code, sizes agree."""
    import pyarrow.parquet as pq

    from adalabelhash.fileio import read_json

    directory = Path(directory)
    try:
        info = read_json(directory / "database.json")
        with np.load(directory / "codes.npz") as data:
            ids, codes = data["ids"], data["codes"]
        table = pq.read_table(directory / "items.parquet", columns=["id", "path", "labels"])
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{directory}: not a readable encoded database ({exc.__class__.__name__}: {exc})") from None
    if info.get("format") != FORMAT:
        raise UserError(f"{directory}: database format {info.get('format')!r}, this version reads {FORMAT}")
    if codes.ndim != 2 or codes.dtype != np.uint8 or len(codes) != len(ids) or len(ids) != table.num_rows:
        raise UserError(f"{directory}: {len(codes)} codes, {len(ids)} ids and {table.num_rows} items do not match")
    if 8 * codes.shape[1] != info.get("bits") or len(ids) != info.get("count"):
        raise UserError(f"{directory}: database.json says {info.get('count')} x {info.get('bits')} bits, "
                        f"codes are {len(ids)} x {8 * codes.shape[1]}")
    if not np.array_equal(table.column("id").to_numpy(), ids):
        raise UserError(f"{directory}: items.parquet ids are not the codes' ids")
    labels = [",".join(names) for names in table.column("labels").to_pylist()]
    return Database(ids.astype(np.int64), codes, table.column("path").to_pylist(), labels, info["classes"],
                    info.get("dataset_fingerprint", ""))
