"""The Dockerfile cannot be built here (no Docker daemon); keep it honest anyway."""

import shlex
import subprocess
import sys
from pathlib import Path

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


def test_every_copied_path_exists_and_the_package_is_complete():
    copies = [rest.split()[:-1] for keyword, rest in instructions() if keyword == "COPY"]
    assert copies, "the Dockerfile copies the project"
    copied = {src for sources in copies for src in sources}
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such path"
    # everything the installed package imports at run time is copied
    assert {"adalabelhash", "components", "pipelines", "pyproject.toml", "constraints.txt"} <= copied


def test_non_root_user_and_adalabelhash_entrypoint():
    keywords = instructions()
    users = [rest for keyword, rest in keywords if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    (entrypoint,) = [rest for keyword, rest in keywords if keyword == "ENTRYPOINT"]
    assert entrypoint == '["adalabelhash"]'
    args = [rest for keyword, rest in keywords if keyword == "ARG"]
    assert "DEVICE=cpu" in args, "CPU by default, GPU with --build-arg DEVICE=gpu"


def test_install_command_resolves_here_and_entrypoint_runs():
    (run,) = [rest for keyword, rest in instructions() if keyword == "RUN" and "pip install" in rest]
    install = run.split("&&")[-1].strip()
    argv = shlex.split(install.replace("$DEVICE", "cpu"))
    assert argv[:2] == ["pip", "install"] and "-c" in argv and "constraints.txt" in argv
    # The same resolution, against what this environment has: nothing missing, nothing to change.
    dry = subprocess.run([sys.executable, "-m", *argv, "--dry-run", "--no-build-isolation"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert dry.stdout.strip().splitlines()[-1] == "Would install adalabelhash-0.1.0", dry.stdout[-2000:]
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout
    entry = subprocess.run([str(Path(sys.executable).parent / "adalabelhash"), "--help"], capture_output=True,
                           text=True, timeout=120)
    assert entry.returncode == 0 and "train" in entry.stdout and "kfp" in entry.stdout
