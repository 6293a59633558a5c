"""Manifest paths: relative POSIX paths that may not leave the data root.

Standard library only, so that worker processes of the file passes start fast.
"""

from __future__ import annotations

import os
import posixpath

from adalabelhash.errors import UserError


def check_relative_path(path: str, where: str) -> str:
    """A manifest path must be a normalised POSIX path inside the data root (lexically)."""
    if not isinstance(path, str) or not path:
        raise UserError(f"{where}: empty path")
    if "\\" in path or "\0" in path:
        raise UserError(f"{where}: path {path!r} must use '/' separators")
    if path.startswith("/"):
        raise UserError(f"{where}: path {path!r} is absolute; paths are relative to the data root")
    if ".." in path.split("/"):
        raise UserError(f"{where}: path {path!r} contains '..' and could escape the data root")
    if posixpath.normpath(path) != path:
        raise UserError(f"{where}: path {path!r} is not normalised (expected {posixpath.normpath(path)!r})")
    return path


class DataRoot:
    """Resolves manifest paths under one root directory, refusing any that leave it.

    `..` and absolute paths are refused lexically; symlinks (of folders or files) are followed
    and refused when their target lies outside the root. Each folder is resolved once per
    DataRoot, so checking N files in D folders costs D `realpath` calls and N `lstat`s (the
    per-file `Path.resolve()` this replaces cost as much as decoding a CIFAR JPEG).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        self.real = os.path.realpath(root)
        self._folders: dict[str, str] = {}

    def resolve(self, path: str) -> str:
        check_relative_path(path, self.root)
        folder, name = posixpath.split(path)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.realpath(os.path.join(self.real, folder))
        full = os.path.join(real_folder, name)
        if os.path.islink(full):
            full = os.path.realpath(full)
        if not full.startswith(self.real.rstrip(os.sep) + os.sep):
            raise UserError(f"{os.path.join(self.root, path)}: resolves to {full}, outside the data root {self.real}")
        return full
