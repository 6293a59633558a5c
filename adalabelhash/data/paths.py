"""Manifest paths: relative POSIX paths that may not leave the data root.

A data root is a local directory or a URL (`s3://bucket/prefix`, `gs://...`: any fsspec URL),
kept as a string throughout (`Path` would turn `s3://b` into `s3:/b`). Standard library only,
fsspec is imported when a URL is read, so that worker processes of the file passes start fast.
"""

from __future__ import annotations

import os
import posixpath
import re
from itertools import islice
from typing import Iterable, Iterator

from adalabelhash.errors import UserError


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# s3fs asks for an object's size before its GET (a HEAD: it would split one over 50 MB into ranged
# GETs) unless told to use one connection per object: an image is fetched whole, in one GET.
_ONE_GET = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}
# Objects fetched together by `read_many`: enough to keep a store's connection pool busy (s3fs
# opens 10 connections), few enough that their bytes stay small (128 photos of 1 MB per process;
# `map_chunks` hands a process up to a quarter of its share of the paths at once, 25,000 of 200,000).
FETCH_WINDOW = 128


def is_url(root: str | os.PathLike) -> bool:
    """Whether `root` is an fsspec URL (`scheme://...`) rather than a local path."""
    return isinstance(root, str) and _URL.match(root) is not None


def join(root: str | os.PathLike, *parts: str) -> str:
    """`root/part/...` for a local root or a URL; empty parts are skipped."""
    parts = [part for part in parts if part]
    if is_url(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def url_filesystem(url: str):
    """(fsspec filesystem, its path) for `url`; a scheme with no driver installed is a UserError."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:  # "Please install gcsfs...", "Protocol not known: foo"
        raise UserError(f"{url}: cannot open this URL ({exc})") from None


def _store_error(url: str, exc: Exception) -> UserError:
    """A store's own failure (unreachable endpoint, refused credentials) as one line naming `url`."""
    return UserError(f"{url}: cannot read from the object store ({type(exc).__name__}: {exc})")


def cannot_read(name: str | os.PathLike, exc: OSError) -> str:
    """Why a file could not be read, in one line naming it."""
    return f"{name}: cannot read ({exc.strerror or exc})"


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole content of a local file (plain `open`) or of the object at a URL (fsspec).

    A missing file or object raises FileNotFoundError and any other unreadable one OSError, as
    `open` does; a store that cannot be reached at all (or a scheme with no driver) is a UserError.
    """
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    data = _fetch([path])[path]
    if isinstance(data, OSError):
        raise data
    return data


def read_many(paths: Iterable[str | os.PathLike | Exception]) -> Iterator[bytes | Exception]:
    """`read_bytes` of each path, in order, with an unreadable file's OSError in its place (not raised).

    Local files are read one at a time, as `read_bytes` reads them. Objects at URLs are fetched
    FETCH_WINDOW at a time, concurrently: one GET after another waits a round trip each (10-50 ms
    on S3). A store that cannot be reached at all is still one UserError. An item that is already
    an exception (a path the caller refused) is passed through, so results stay aligned with rows.
    """
    paths = iter(paths)
    while window := list(islice(paths, FETCH_WINDOW)):
        fetched = _fetch([path for path in window if is_url(path)])
        for path in window:
            if isinstance(path, Exception):
                yield path
            elif is_url(path):
                yield fetched[path]
            else:
                try:
                    data = read_bytes(path)
                except OSError as exc:
                    data = exc
                yield data


def _fetch(urls: list[str]) -> dict[str, bytes | OSError]:
    """{url: content or OSError}: one concurrent call per filesystem (fsspec's `cat_ranges` gathers
    the GETs of an async one such as s3fs; unlike `cat`, it does not expand `[`, `*`, `?` as globs)."""
    by_filesystem: dict = {}
    for url in dict.fromkeys(urls):
        fs, fs_path = url_filesystem(url)
        by_filesystem.setdefault(fs, {})[url] = fs_path
    fetched = {}
    for fs, fs_paths in by_filesystem.items():
        first = next(iter(fs_paths))
        options = _ONE_GET.get(first.split("://", 1)[0], {})
        try:
            contents = fs.cat_ranges(list(fs_paths.values()), None, None, on_error="return", **options)
        except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, google-auth... raise their own types
            raise _store_error(first, exc) from None
        for url, content in zip(fs_paths, contents):
            if isinstance(content, Exception) and not isinstance(content, OSError):
                raise _store_error(url, content) from None
            fetched[url] = content
    return fetched


def require_directory(path: str | os.PathLike, what: str, hint: str = "") -> None:
    """UserError naming `path` (the `what`) unless it is a local directory, or a URL with objects under it."""
    if not is_url(path):
        if not os.path.isdir(path):
            raise UserError(f"{path}: {what} is not a directory{hint}")
        return
    fs, fs_path = url_filesystem(path)
    try:
        kind = fs.info(fs_path)["type"]
    except FileNotFoundError as exc:  # s3fs: "The specified bucket does not exist", or just the path
        reason = str(exc) if str(exc).strip("/") not in ("", fs_path.strip("/")) else "no objects under it"
        raise UserError(f"{path}: {what} not found ({reason}){hint}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc}){hint}") from None
    except Exception as exc:  # noqa: BLE001 - see read_bytes
        raise _store_error(path, exc) from None
    if kind != "directory":
        raise UserError(f"{path}: {what} is a single object, not a folder{hint}")


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
    A URL root has no symlinks: its paths are checked lexically and appended to it.
    """

    def __init__(self, root: str | os.PathLike):
        self.url = is_url(root)
        self.root = root.rstrip("/") if self.url else os.fspath(root)
        self.real = self.root if self.url else os.path.realpath(root)
        self._folders: dict[str, str] = {}

    def resolve_or_error(self, path: str) -> str | UserError:
        """`resolve`, with a refusal returned rather than raised: to be reported per row (see `read_many`)."""
        try:
            return self.resolve(path)
        except UserError as exc:
            return exc

    def resolve(self, path: str) -> str:
        check_relative_path(path, self.root)
        if self.url:
            return f"{self.root}/{path}"
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
