"""`adalabelhash prepare`: raw image source -> manifest.parquet (labels, seeded splits, sha256).

The manifest's paths are relative to `prepare.root`; the split sizes the protocol promises
are recorded in its info so that the data gate can check them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from adalabelhash.data.sources import Draft


@dataclass(frozen=True)
class PrepareParams:
    source: Literal["digits", "imagefolder", "cifar10", "listfile"] = "digits"
    root: str = "data/digits"  # data root; manifest paths are relative to it
    protocol: Literal["I", "II"] | None = None  # cifar10 only (see datasets README)
    classes: list[str] | None = None  # imagefolder: class order (default: sorted folder names)
    query_per_class: int | None = None  # None: 20 (digits, imagefolder), 100 (cifar10 I)
    train_per_class: int | Literal["rest"] | None = None  # None: "rest" (digits, imagefolder), 500 (cifar10 I)
    val_per_class: int = 10  # carved from each class's training pool, every single-label source
    val_size: int | None = None  # listfile: val images carved from train (None: val_per_class x classes)
    list_files: dict[str, str] | None = None  # listfile: {train, query, database} -> list file path
    class_names: str | None = None  # listfile: file with one class name per line (else class_0..)
    unlabeled: Literal["drop", "refuse"] = "drop"  # listfile: lines with no label are left out (and counted) or refused
    seed: int = 0  # split draw
    workers: int = 0  # hashing processes (0: one per CPU); does not change the result

    def __post_init__(self):
        minimum = {"query_per_class": 1, "train_per_class": 1, "val_per_class": 0, "val_size": 0, "workers": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, int) and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        own = {"protocol": self.source == "cifar10", "classes": self.source == "imagefolder",
               "list_files": self.source == "listfile", "class_names": self.source == "listfile",
               "val_size": self.source == "listfile"}
        misplaced = [key for key, allowed in own.items() if getattr(self, key) is not None and not allowed]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} do(es) not apply to source {self.source}")
        if self.source == "cifar10" and self.protocol is None:
            raise ValueError("source cifar10 needs protocol: I or II")
        fixed = self.source == "listfile" or (self.source == "cifar10" and self.protocol == "II")
        if fixed and (self.query_per_class is not None or self.train_per_class is not None):
            raise ValueError("query_per_class/train_per_class do not apply: the splits of "
                             f"{'the list files' if self.source == 'listfile' else 'protocol II'} are given")
        if self.source == "listfile":
            if not self.list_files or set(self.list_files) != {"train", "query", "database"}:
                raise ValueError("source listfile needs list_files with exactly the keys train, query, database")


def build_draft(params: PrepareParams) -> "Draft":
    """Dispatch to the source; the per-source defaults for None sizes live here."""
    from adalabelhash.data import sources

    if params.source in ("digits", "imagefolder"):
        classes = sources.DIGITS_CLASSES if params.source == "digits" else params.classes
        return sources.imagefolder_draft(params.root, classes, params.query_per_class or 20, params.val_per_class,
                                         params.train_per_class or "rest", params.seed)
    if params.source == "cifar10":
        if params.protocol == "I":
            return sources.cifar10_draft(params.root, "I", params.val_per_class, params.seed,
                                         params.query_per_class or 100, params.train_per_class or 500)
        return sources.cifar10_draft(params.root, "II", params.val_per_class, params.seed)
    _require_under_root(params)
    return sources.listfile_draft(params.list_files, params.class_names, params.seed, params.val_size,
                                  params.val_per_class, params.unlabeled)


def _require_under_root(params: PrepareParams) -> None:
    """List files live under the data root: `dvc repro` then reruns prepare when one changes
    (the root is the stage's dependency), and a cluster finds them where it finds the images."""
    from adalabelhash.data.paths import check_relative_path, is_url
    from adalabelhash.errors import UserError

    def lexically_under(name: str, root: str) -> bool:  # an object store has no symlinks to resolve
        try:
            return name.startswith(root + "/") and bool(check_relative_path(name[len(root) + 1:], name))
        except UserError:  # `..`, not normalised: refused, not normalised away
            return False

    url = is_url(params.root)
    root = params.root.rstrip("/") if url else Path(params.root).resolve()
    for name in [*params.list_files.values(), *([params.class_names] if params.class_names else [])]:
        if url:
            inside = lexically_under(name, root)
        else:
            inside = not is_url(name) and Path(name).resolve().is_relative_to(root)
        if not inside:
            raise UserError(f"{name}: list files must be under prepare.root ({params.root}), where DVC tracks "
                            f"them as the prepare stage's dependency")


def hash_files(root: str, paths: list[str]) -> list[tuple[str | None, str | None]]:
    """(hex digest, None) or (None, why not) per path: every unreadable file is reported, not just the first."""
    from adalabelhash.data.paths import DataRoot, cannot_read, join, read_many
    from adalabelhash.errors import UserError

    data_root = DataRoot(root)
    hashed = []
    for path, data in zip(paths, read_many(map(data_root.resolve_or_error, paths))):
        if isinstance(data, UserError):
            hashed.append((None, str(data)))
        elif isinstance(data, OSError):
            hashed.append((None, cannot_read(join(root, path), data)))
        else:
            hashed.append((hashlib.sha256(data).hexdigest(), None))
    return hashed


def prepare(params: PrepareParams, out_dir: str | Path) -> dict[str, Any]:
    """Build, hash and save `out_dir/manifest.parquet`; return a summary with the fingerprint."""
    from adalabelhash.data.manifest import MANIFEST_NAME, Manifest
    from adalabelhash.data.images import map_chunks
    from adalabelhash.errors import UserError

    draft = build_draft(params)
    hashed = map_chunks(partial(hash_files, params.root), draft.frame["path"], params.workers)
    errors = [error for _, error in hashed if error]
    if errors:
        raise UserError(f"{len(errors)} file(s) could not be hashed, e.g. {'; '.join(errors[:3])}")
    frame = draft.frame.assign(sha256=[digest for digest, _ in hashed])
    info = {"source": params.source, "root": params.root, "protocol": params.protocol, "seed": params.seed,
            "sizes": draft.expected, **draft.info, "params": dataclasses.asdict(params)}
    manifest = Manifest(frame, draft.classes, info)
    path = Path(out_dir) / MANIFEST_NAME
    manifest.save(path)
    return {"manifest": str(path), "fingerprint": manifest.fingerprint(), "images": len(manifest),
            "classes": manifest.num_classes, "sizes": manifest.split_sizes(), "expected_sizes": draft.expected,
            **{k: v for k, v in draft.info.items() if k in ("official_counts", "unlabeled_dropped")}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (section 'prepare')")
    parser.add_argument("--out", required=True, help="output directory for manifest.parquet")


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_section

    params = load_section(PrepareParams, "prepare", args.params)
    summary = prepare(params, args.out)
    sizes = ", ".join(f"{k} {v:,}" for k, v in summary["sizes"].items())
    print(f"prepare {params.source}{' protocol ' + params.protocol if params.protocol else ''}: "
          f"{summary['images']:,} images, {summary['classes']} classes ({sizes})")
    print(f"  {summary['manifest']}  fingerprint {summary['fingerprint'][:16]}")
    if any(summary.get("unlabeled_dropped", {}).values()):
        dropped = ", ".join(f"{k} {v:,}" for k, v in summary["unlabeled_dropped"].items())
        print(f"  left out lines with no label (prepare.unlabeled: drop): {dropped}")
    if summary.get("official_counts") is False:
        print("  note: the CIFAR-10 tree does not have the official 5,000/1,000 images per class")
