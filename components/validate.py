"""`adalabelhash validate`: the data gate (Great Expectations) over the manifest and its files.

Writes `validation.json` (GX `describe_dict()` + file facts + failures) and an offline
`data_docs.html` whether the gate passes or fails: on failure they are the report, and the
step raises `GateFailed` (exit status 2 from the CLI) after printing the failures to stderr.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adalabelhash.errors import UserError


@dataclass(frozen=True)
class ValidateParams:
    min_side: int = 8  # smallest accepted width/height in px (digits are 8x8, CIFAR-10 32x32)
    max_side: int = 4096  # largest accepted width/height in px
    max_bytes: int = 20_000_000  # largest accepted file size
    size_mostly: float = 1.0  # fraction of images that must meet the three size bounds above
    max_examples: int = 10  # offending rows listed per failed expectation
    workers: int = 0  # fact-gathering processes (0: one per CPU); does not change the result

    def __post_init__(self):
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(f"need 1 <= min_side <= max_side, got {self.min_side} and {self.max_side}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if not 0.0 < self.size_mostly <= 1.0:
            raise ValueError(f"size_mostly must be in (0, 1], got {self.size_mostly}")
        if self.max_examples < 1 or self.workers < 0:
            raise ValueError("max_examples must be >= 1 and workers >= 0")


class GateFailed(UserError):
    """The data did not pass; `details` is the readable block of failed checks and examples."""

    def __init__(self, message: str, details: str, summary: dict[str, Any]):
        super().__init__(message)
        self.details = details
        self.summary = summary


def validate(params: ValidateParams, manifest_path: str | Path, out_dir: str | Path,
             data_root: str | Path | None = None) -> dict[str, Any]:
    """Check `manifest_path` and the files under `data_root` (default: the root recorded by prepare)."""
    from adalabelhash.data.manifest import Manifest
    from adalabelhash.data.paths import require_directory
    from adalabelhash.data.validation import DOCS_NAME, REPORT_NAME, check_dataset
    from adalabelhash.fileio import write_json, write_text

    manifest = Manifest.load(manifest_path)
    root = data_root if data_root is not None else manifest.info.get("root")
    if not root:
        raise UserError(f"{manifest_path}: no data root recorded; pass --data-root")
    require_directory(root, "data root")
    outcome = check_dataset(manifest, root, min_side=params.min_side, max_side=params.max_side,
                            max_bytes=params.max_bytes, size_mostly=params.size_mostly,
                            workers=params.workers, max_examples=params.max_examples)
    out_dir = Path(out_dir)
    fingerprint = manifest.fingerprint()
    summary = {"success": outcome["success"], "manifest": str(manifest_path), "data_root": str(root),
               "fingerprint": fingerprint, "images": len(manifest), "expectations": outcome["expectations"],
               "failed": len(outcome["failed"]), "report": str(out_dir / REPORT_NAME),
               "data_docs": str(out_dir / DOCS_NAME), "seconds": outcome["seconds"]}
    report = {**outcome["result"].describe_dict(), "summary": summary, "failures": outcome["failed"],
              "facts": outcome["facts"]}
    write_json(out_dir / REPORT_NAME, report)
    write_text(out_dir / DOCS_NAME, outcome["html"])
    if not outcome["success"]:
        raise GateFailed(f"data gate failed: {len(outcome['failed'])} of {outcome['expectations']} expectations "
                         f"failed; report {summary['report']} and {summary['data_docs']}", outcome["text"], summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (section 'validate')")
    parser.add_argument("--manifest", required=True, help="manifest.parquet written by `adalabelhash prepare`")
    parser.add_argument("--data-root", help="directory or URL (s3://...) the manifest paths are relative to "
                        "(default: the root recorded in the manifest)")
    parser.add_argument("--out", required=True, help="output directory for validation.json and data_docs.html")


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_section

    params = load_section(ValidateParams, "validate", args.params)
    try:
        summary = validate(params, args.manifest, args.out, args.data_root)
    except GateFailed as exc:
        print(exc.details, file=sys.stderr)
        raise
    seconds = summary["seconds"]
    print(f"validate: PASSED {summary['expectations']} expectations on {summary['images']:,} images "
          f"(facts {seconds['facts']} s, GX {seconds['gx']} s)")
    print(f"  dataset version {summary['fingerprint'][:16]}; report {summary['report']}, {summary['data_docs']}")
