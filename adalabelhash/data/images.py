"""Image I/O with the checks a data gate needs: one read per file, guarded decode, clear errors.

Every failure names the file. The decompression-bomb guard reads the size from the header
(`Image.open` parses only the header) and refuses before any pixel buffer is allocated.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from adalabelhash.data.paths import DataRoot, cannot_read, read_many
from adalabelhash.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FACT_COLUMNS = ("found", "decodable", "error", "mode", "width", "height", "bytes", "file_sha256")
# Below this many files a process pool costs more to start than it saves.
POOL_MIN_ITEMS = 2000
# Far above any retrieval benchmark image; a 20,000 x 20,000 "image" (400 MP) is refused unread.
MAX_PIXELS = 50_000_000


def _decode(data: bytes, path: str | os.PathLike) -> Image.Image:
    """Header check, then a full decode (truncated data raises here, not later in a DataLoader)."""
    if not data:
        raise UserError(f"{path}: empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: refused by the decompression-bomb guard (over {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a recognised image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable image header ({exc})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise UserError(
            f"{path}: refused by the decompression-bomb guard ({width}x{height} = {width * height:,} pixels, "
            f"limit {MAX_PIXELS:,})"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: truncated or corrupt image data ({exc})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB. Transparent pixels are composited on black, so a cut-out object keeps
    its own pixels and the hidden colour under alpha 0 (often garbage) never reaches the model.
    16-bit grayscale is scaled to 8 bits (PIL's plain convert would clip it to white)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size)
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image if image.mode == "RGB" else image.convert("RGB")


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode `path` (a file, or an object at a URL) fully and return it upright, as RGB (grayscale,
    palette, RGBA, CMYK... accepted). Upright: a camera photo's EXIF orientation is applied, so the
    model sees what a viewer shows."""
    return next(read_rgbs([path]))


def read_rgbs(paths: Sequence[str | os.PathLike]) -> Iterator[Image.Image]:
    """`read_rgb` of each path, the files read by `read_many` (objects at URLs fetched concurrently)."""
    for path, data in zip(paths, read_many(paths)):
        if isinstance(data, OSError):
            raise UserError(cannot_read(path, data)) from None
        yield decode_rgb(data, path)


def decode_rgb(data: bytes, name: str | os.PathLike) -> Image.Image:
    """`read_rgb` for bytes in memory (an upload); errors name `name`."""
    image = _decode(data, name)
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def image_facts(path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """What the data gate needs about one file, from ONE read: size, hash, decodability, shape.

    Never raises for a bad file: the reason goes into `error` (naming the file as `name`, e.g.
    its manifest path, default `path`) so the gate can list every bad file.
    """
    return _facts(next(read_many([path])), name or str(path))


def _facts(data: bytes | Exception, name: str) -> dict[str, Any]:
    """`image_facts` of a file's content, or of why there is none (see `read_many`)."""
    facts: dict[str, Any] = {**dict.fromkeys(FACT_COLUMNS), "found": False, "decodable": False}
    if isinstance(data, Exception):  # missing, unreadable, or a path refused before any read
        facts["error"] = (f"{name}: file not found" if isinstance(data, FileNotFoundError)
                          else cannot_read(name, data) if isinstance(data, OSError) else str(data))
        return facts
    facts.update(found=True, bytes=len(data), file_sha256=hashlib.sha256(data).hexdigest())
    try:
        image = _decode(data, name)
    except UserError as exc:
        facts["error"] = str(exc)
        try:  # the header size, when there is one, still helps the report
            with Image.open(io.BytesIO(data)) as header:
                facts["width"], facts["height"] = header.size
        except Exception:  # noqa: BLE001 - best effort only
            pass
        return facts
    facts.update(decodable=True, mode=image.mode, width=image.width, height=image.height)
    return facts


def facts_for(root: str, paths: list) -> list[dict[str, Any]]:
    """`image_facts` for manifest paths; an unsafe or null path becomes an `error`, not a raise."""
    data_root = DataRoot(root)
    resolved = [data_root.resolve_or_error(path) if isinstance(path, str)
                else UserError(f"row without a path ({path!r})") for path in paths]
    return [_facts(data, full if data_root.url else path)  # an object is named by its URL
            for path, full, data in zip(paths, resolved, read_many(resolved))]


def map_chunks(fn: Callable[[list], list], items: Iterable, workers: int = 0) -> list:
    """`fn` over chunks of `items` in a process pool (`workers` 0: one per CPU), results in order.

    Processes, not threads: decoding small JPEGs spends most of its time in Python under the
    GIL, and threads were slower than one loop (benchmarks/validate_speed). `forkserver`
    because the parent may hold pyarrow / GX threads that a plain fork would copy mid-flight.
    `fn` takes a whole chunk so that it can share per-chunk caches (e.g. resolved folders).
    """
    items = list(items)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(items) < POOL_MIN_ITEMS:
        return fn(items)
    import multiprocessing

    size = -(-len(items) // (workers * 4))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        return [result for chunk in pool.map(fn, chunks) for result in chunk]
