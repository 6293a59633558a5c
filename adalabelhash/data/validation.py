"""The data gate: a Great Expectations suite, defined in code, over manifest rows + file facts.

One DataFrame holds a row per manifest entry plus what one read of its file showed (found,
decodable, size, hash) and, per class, the row's label bit if it is a training image (so
"every class has training images" is a column sum). GX runs in an ephemeral context; the
Data Docs page is rebuilt as one self-contained HTML file that renders offline.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adalabelhash.data.images import FACT_COLUMNS, facts_for, map_chunks
from adalabelhash.data.manifest import SPLITS, Manifest
from adalabelhash.errors import UserError
from adalabelhash.fileio import read_json

REPORT_NAME = "validation.json"
DOCS_NAME = "data_docs.html"


def gather_facts(manifest: Manifest, root: str | os.PathLike, workers: int = 0) -> pd.DataFrame:
    """One read of every manifest file (in a process pool) -> FACT_COLUMNS, row-aligned."""
    facts = map_chunks(partial(facts_for, os.fspath(root)), manifest.frame["path"], workers)
    frame = pd.DataFrame(facts, columns=list(FACT_COLUMNS))
    return frame.astype({"width": "Int64", "height": "Int64", "bytes": "Int64"})  # ints, with gaps for bad files


def facts_summary(frame: pd.DataFrame, max_errors: int = 50) -> dict[str, Any]:
    """What the files looked like, for the report: counts, modes, size ranges, the first errors."""
    ok = frame[frame["decodable"]]
    errors = frame.loc[frame["error"].notna(), ["path", "error"]]

    def span(column: str) -> dict[str, int] | None:
        values = ok[column]
        return {"min": int(values.min()), "max": int(values.max())} if len(values) else None

    return {
        "images": len(frame),
        "found": int(frame["found"].sum()),
        "decodable": int(frame["decodable"].sum()),
        "error_count": len(errors),
        "errors": errors.head(max_errors).to_dict("records"),
        "modes": dict(Counter(ok["mode"])),
        "width": span("width"),
        "height": span("height"),
        "bytes": {**span("bytes"), "total": int(ok["bytes"].sum())} if len(ok) else None,
    }


def train_class_column(name: str) -> str:
    return f"train[{name}]"


def gate_frame(manifest: Manifest, facts: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows + facts + one column per class: its label bit on training rows, else 0."""
    frame = pd.concat([manifest.frame, facts], axis=1)
    labels = manifest.frame["labels"]
    width = manifest.num_classes
    well_formed = labels.notna() & (labels.str.len() == width) & labels.str.fullmatch("[01]*").fillna(False)
    bits = np.zeros((len(frame), width), dtype=np.uint8)
    rows = (well_formed & manifest.frame["train"]).to_numpy()
    if rows.any():
        bits[rows] = manifest.label_matrix(rows)
    per_class = pd.DataFrame(bits, columns=[train_class_column(c) for c in manifest.classes])
    return pd.concat([frame, per_class], axis=1)


def expectations(manifest: Manifest, expected_sizes: dict[str, int], *, min_side: int, max_side: int,
                 max_bytes: int, size_mostly: float) -> list:
    """The suite. Each expectation's meta['check'] is the one-line rule shown in reports."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations

    def check(expectation_cls, text: str, **kwargs):
        return expectation_cls(meta={"check": text}, **kwargs)

    query_rows = {"row_condition": Column("query") == True}  # noqa: E712 - GX condition, not a comparison
    width = manifest.num_classes
    suite = [
        check(E.ExpectColumnValuesToNotBeNull, "every row has a path", column="path"),
        check(E.ExpectColumnValuesToBeUnique, "paths are unique", column="path"),
        check(E.ExpectColumnValuesToBeInSet, "every file exists inside the data root", column="found",
              value_set=[True]),
        check(E.ExpectColumnValuesToNotBeNull, "every row records a sha256", column="sha256"),
        check(E.ExpectColumnPairValuesToBeEqual, "file content matches the recorded sha256",
              column_A="sha256", column_B="file_sha256", ignore_row_if="either_value_is_missing"),
        check(E.ExpectColumnValuesToBeInSet, "every file decodes as an image", column="decodable",
              value_set=[True], row_condition=Column("found") == True),  # noqa: E712
        check(E.ExpectColumnValueLengthsToEqual, f"every label string has one character per class ({width})",
              column="labels", value=width),
        check(E.ExpectColumnValuesToMatchRegex, "labels are made of 0/1 only", column="labels", regex="^[01]+$"),
        check(E.ExpectColumnValuesToMatchRegex, "every image has at least one label", column="labels",
              regex="1"),
        check(E.ExpectColumnValuesToBeInSet, "no query is a training image", column="train",
              value_set=[False], **query_rows),
        check(E.ExpectColumnValuesToBeInSet, "no query is a validation image", column="val",
              value_set=[False], **query_rows),
        check(E.ExpectColumnValuesToBeInSet, "no validation image is a training image", column="train",
              value_set=[False], row_condition=Column("val") == True),  # noqa: E712
        check(E.ExpectColumnValuesToBeBetween, f"width within [{min_side}, {max_side}] px", column="width",
              min_value=min_side, max_value=max_side, mostly=size_mostly),
        check(E.ExpectColumnValuesToBeBetween, f"height within [{min_side}, {max_side}] px", column="height",
              min_value=min_side, max_value=max_side, mostly=size_mostly),
        check(E.ExpectColumnValuesToBeBetween, f"file size at most {max_bytes:,} bytes", column="bytes",
              max_value=max_bytes, mostly=size_mostly),
    ]
    suite += [check(E.ExpectColumnSumToBeBetween, f"{split} has {n:,} images (recorded by prepare)",
                    column=split, min_value=n, max_value=n) for split, n in expected_sizes.items()]
    suite += [check(E.ExpectColumnSumToBeBetween, f"class '{name}' has training images",
                    column=train_class_column(name), min_value=1) for name in manifest.classes]
    return suite


def run_gate(frame: pd.DataFrame, suite: list, max_examples: int = 10) -> tuple[Any, str, str]:
    """Run the suite through a Checkpoint; return (CheckpointResult, Data Docs page, its GX CSS)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                              ProgressBarsConfig)

    with tempfile.TemporaryDirectory(prefix="gx-docs-") as docs:
        site = {"class_name": "SiteBuilder", "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}
        config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                                   analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False),
                                   data_docs_sites={"local_site": site})
        context = gx.get_context(mode="ephemeral", project_config=config)
        batch = (context.data_sources.add_pandas("manifest").add_dataframe_asset("rows_and_files")
                 .add_batch_definition_whole_dataframe("all"))
        expectation_suite = context.suites.add(gx.ExpectationSuite(name="data_gate"))
        for expectation in suite:
            expectation_suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name="data_gate", data=batch, suite=expectation_suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name="data_gate", validation_definitions=[definition],
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": ["path"],
                           "partial_unexpected_count": max_examples}))
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        context.build_data_docs()
        pages = sorted(Path(docs, "validations").rglob("*.html"))
        css = Path(docs, "static", "styles", "data_docs_default_styles.css").read_text()
        return result, pages[0].read_text(), css


_OFFLINE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #ccc; padding: .25rem .5rem; }
.text-danger, .fa-times { color: #b00020; } .text-success, .fa-check-circle { color: #137333; }
nav, .navbar, form, .d-none { display: none; }
pre.gate { background: #f6f6f6; border-left: 4px solid #888; padding: .75rem; white-space: pre-wrap; }
"""


def offline_html(page: str, gx_css: str, preface: str) -> str:
    """A Data Docs page with every remote script/stylesheet/image removed and the CSS inlined.

    GX pages load Bootstrap, jQuery and Vega from CDNs; offline they render blank-ish. Without
    Bootstrap's CSS the collapsed sections simply show, which is what a static report wants.
    `preface` (the gate's own summary, which names offending files) goes first: GX's tables
    show unexpected values but not which rows hold them.
    """
    page = page.replace("</head>", f"<style>{gx_css}\n{_OFFLINE_CSS}</style>\n</head>", 1)
    page = re.sub(r"(<body\b[^>]*>)", lambda m: f'{m.group(1)}\n<pre class="gate">{html.escape(preface)}</pre>',
                  page, count=1, flags=re.I)
    page = re.sub(r"<script\b.*?</script>", "", page, flags=re.S | re.I)
    page = re.sub(r"<link\b[^>]*>", "", page, flags=re.I)
    page = re.sub(r"<img\b[^>]*\bsrc=[\"']https?://[^>]*>", "", page, flags=re.I)
    page = re.sub(r"url\(['\"]?https?://[^)]*\)", "none", page, flags=re.I)
    page = re.sub(r"href=[\"'](?:https?://|\.\./|index\.html)[^\"']*[\"']", 'href="#"', page, flags=re.I)
    return page


def failures(result: Any, facts_by_path: dict[str, str]) -> list[dict[str, Any]]:
    """Failed expectations as {check, expectation, observed, unexpected_count, examples}.

    Examples are offending paths, with the file error when the facts have one.
    """
    failed = []
    for suite_result in result.run_results.values():
        for item in suite_result.results:
            if item.success:
                continue
            config, res = item.expectation_config, item.result or {}
            column = config.kwargs.get("column")
            examples = [_example(index, column, facts_by_path)
                        for index in res.get("partial_unexpected_index_list") or []]
            failed.append({
                "check": config.meta.get("check", config.type),
                "expectation": config.type,
                "column": column or [config.kwargs.get("column_A"), config.kwargs.get("column_B")],
                "observed": _plain(res.get("observed_value")),
                "unexpected_count": res.get("unexpected_count"),
                "examples": examples,
            })
    return failed


def _example(index: Any, column: str | None, errors: dict[str, str]) -> str:
    """An offending row as text: the file error for file checks, else the path and the bad value."""
    path = index.get("path") if isinstance(index, dict) else None
    if not isinstance(path, str):
        return f"row {index!r}"
    if column in ("found", "decodable") and path in errors:
        return errors[path]
    value = index.get(column)
    if column != "path" and value is not None and not isinstance(value, (bool, np.bool_)):
        return f"{path} ({column} {_plain(value)!r})"
    return path


def _plain(value: Any) -> Any:
    """numpy scalars (GX's observed values) -> Python, for JSON."""
    return value.item() if isinstance(value, np.generic) else value


def format_failures(failed: list[dict[str, Any]], total: int) -> str:
    """One readable block: each failed rule, how often, and example offending paths."""
    lines = [f"data gate FAILED: {len(failed)} of {total} expectations failed"]
    for item in failed:
        if item["unexpected_count"] is not None:
            detail = f"{item['unexpected_count']} offending row(s)"
        else:
            detail = f"observed {item['observed']}"
        lines.append(f"  x {item['check']}: {detail}")
        lines += [f"      {example}" for example in item["examples"]]
    return "\n".join(lines)


def check_dataset(manifest: Manifest, root: str | os.PathLike, *, min_side: int, max_side: int, max_bytes: int,
                  size_mostly: float, workers: int = 0, max_examples: int = 10) -> dict[str, Any]:
    """Facts in one pass over the files, then the GX suite. Returns everything the report needs."""
    expected = manifest.info.get("sizes")
    if not isinstance(expected, dict) or set(expected) != set(SPLITS):
        raise UserError("manifest info has no expected split sizes (was it written by `adalabelhash prepare`?)")
    started = time.perf_counter()
    facts = gather_facts(manifest, root, workers)
    facts_seconds = time.perf_counter() - started
    frame = gate_frame(manifest, facts)
    suite = expectations(manifest, expected, min_side=min_side, max_side=max_side, max_bytes=max_bytes,
                         size_mostly=size_mostly)
    started = time.perf_counter()
    result, page, css = run_gate(frame, suite, max_examples)
    gx_seconds = time.perf_counter() - started
    errors = frame.loc[frame["error"].notna() & frame["path"].notna(), ["path", "error"]]
    failed = failures(result, dict(zip(errors["path"], errors["error"])))
    if failed:
        text = format_failures(failed, len(suite))
    else:
        text = f"data gate PASSED: {len(suite)} expectations on {len(frame):,} images"
    return {"success": bool(result.success), "result": result, "html": offline_html(page, css, text),
            "text": text, "failed": failed, "expectations": len(suite), "facts": facts_summary(frame),
            "seconds": {"facts": round(facts_seconds, 2), "gx": round(gx_seconds, 2)}}


def require_passed(validation_dir: str | os.PathLike, fingerprint: str | None = None) -> dict[str, Any]:
    """Refuse to go on unless the gate passed, and (given `fingerprint`) on this dataset version."""
    path = Path(validation_dir) / REPORT_NAME
    report = read_json(path)
    summary = report.get("summary") or {}
    if not report.get("success"):
        raise UserError(f"{path}: the data gate failed on this data; fix it and re-run `adalabelhash validate`")
    if fingerprint is not None and summary.get("fingerprint") != fingerprint:
        raise UserError(f"{path}: the gate passed on dataset {str(summary.get('fingerprint'))[:16]}, not on "
                        f"{fingerprint[:16]}; re-run `adalabelhash validate`")
    return summary
