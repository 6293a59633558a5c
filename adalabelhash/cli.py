"""`adalabelhash <command> ...`: one thin CLI over the step functions.

Each command lives in its own module (imported only when it runs, so `--help` is instant)
and exposes `add_arguments(parser)` and `run(args)`. A `UserError` becomes one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "get-data": ("components.get_data", "materialise a dataset source as image files under data/"),
    "prepare": ("components.prepare", "build the manifest: labels, seeded splits, content hashes"),
    "validate": ("components.validate", "the Great Expectations data gate"),
    "train": ("components.train", "train the hash model and its codewords"),
    "export-codewords": ("components.export_codewords", "binarised codewords, distances, heatmap"),
    "convert-onnx": ("components.convert_onnx", "export model.onnx and check bit parity"),
    "encode": ("components.encode", "bulk-encode query/database images with onnxruntime"),
    "evaluate": ("components.evaluate", "retrieval metrics, PR curves, example grid"),
    "score-champion": ("components.score_champion", "re-score the current @champion on this run's data"),
    "promote": ("components.promote", "register the model and gate aliases on mAP"),
    "monitor": ("components.monitor", "drift report: new data vs the champion's data and codes"),
    "search": ("components.search", "find the nearest database images for query images"),
    "retrain": ("pipelines.retrain", "drift report, then `dvc repro` when it says so (for cron)"),
    "serve": ("adalabelhash.serving.cli", "HTTP retrieval service for the registered @champion; follows the alias"),
    "kfp": ("pipelines.cli", "compile, run locally, submit or schedule the Kubeflow pipeline"),
}


def main(argv: list[str] | None = None) -> int:
    from adalabelhash.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"adalabelhash {command}", description=COMMANDS[command][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        module.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: adalabelhash <command> [options]   (adalabelhash <command> -h for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
