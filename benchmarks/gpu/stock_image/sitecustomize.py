"""The CPU rehearsal's stand-in for the stock CUDA PyTorch image: refuse to import what that image
lacks (devices README, KINDS.md), so an import the GPU run cannot satisfy fails here first.
check.sh puts this folder on PYTHONPATH only when GPU_CHECK_CPU=1."""

import importlib.abc
import sys

ABSENT = {"kfp", "mlflow", "great_expectations", "dvc", "sqlalchemy", "fastapi", "uvicorn", "selenium"}


class _NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (the stock CUDA image lacks it: GPU_CHECK_CPU rehearsal)",
                                      name=name)
        return None


sys.meta_path.insert(0, _NotInTheImage())
