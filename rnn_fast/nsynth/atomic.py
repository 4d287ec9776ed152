"""The one way the classifier writes a file that something may read while it is written, or after a crash:
checkpoints, metrics.json, the cache's arrays and manifest, the synthetic set's WAVs and examples.json.

A reader (or a resumed run) sees the previous file or the complete new one, never a torn one: the data goes to a
temporary file of a unique name in the target's folder (the same file system, so the rename is atomic; unique, so
two writers of one target never share a temporary file), is flushed to the disk, and is renamed over the target.
On an error the temporary file is removed and the target is left as it was.
"""
import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_write(path: PathLike, text: bool = False) -> Iterator[IO]:
    """A new file (binary, or text with ``text=True``) that replaces ``path`` when the block ends without an
    error."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "x" if text else "xb") as handle:
            yield handle
        move_into_place(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def move_into_place(finished: PathLike, path: PathLike) -> None:
    """Flushes the finished file ``finished`` to the disk and renames it over ``path`` (same file system). For a
    file built in place over time (the cache's memory-mapped audio); :func:`atomic_write` ends with it too."""
    with open(finished, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(finished, path)


def write_json(path: PathLike, value, indent: Optional[int] = 2) -> None:
    """``value`` as JSON (a newline at the end), written atomically."""
    with atomic_write(path, text=True) as handle:
        handle.write(json.dumps(value, indent=indent) + "\n")
