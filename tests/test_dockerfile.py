"""What the image build (`make image-check`, run in CI) cannot tell quickly: the build context and the
image name, checked in a second without an engine. The build itself, the install and the pipeline
inside the image are proven by `make image-check`."""

import fnmatch
import os
import subprocess
import tomllib
from pathlib import Path

from pipelines.config import GPU_IMAGE, IMAGE

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def in_context(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (last matching pattern wins)."""
    included = True
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.lstrip("!")):
            included = negated
    return included


def test_the_context_holds_every_copied_path_and_every_package():
    copied = {src for keyword, rest in instructions() if keyword == "COPY" for src in rest.split()[:-1]}
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such path"
        assert in_context(src), f"COPY {src}: .dockerignore leaves it out of the build context"
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    top_level = {pattern.rstrip("*") for pattern in packages["include"]}
    assert top_level <= copied, f"packages the image would not install: {sorted(top_level - copied)}"
    assert not in_context(".venv") and not in_context("data") and not in_context("build")


def test_the_image_built_is_the_one_kubeflow_runs():
    def tag(device):
        env = {**os.environ, "DEVICE": device}
        return subprocess.run(["tools/image.sh", "tag"], cwd=REPO, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert tag("cpu") == IMAGE and tag("gpu") == GPU_IMAGE


def test_an_unknown_device_is_one_error_line():
    proc = subprocess.run(["tools/image.sh", "build"], cwd=REPO, env={**os.environ, "DEVICE": "tpu"},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "error: DEVICE=tpu: expected cpu or gpu\n"
