"""Small shared helpers: the project's error type and atomic file output.

    from sftmix.utils import SFTMixError, atomic_write_json, write_jsonl, read_jsonl
    write_jsonl("run/confidence.jsonl", rows)      # tmp file + fsync + rename: never half-written
    rows = read_jsonl("run/confidence.jsonl")       # bad line -> SFTMixError naming file and line

Every output of a run goes through these so that an interrupted run never leaves a truncated file behind
(a stage counts as done when its output exists), and a full disk is reported as one clear line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class SFTMixError(ValueError):
    """An error the user can fix (bad input, bad config). The CLI prints it as one line, without a traceback."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file 0600; give it the permissions a plain open() would (0666 minus the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    kwargs = {} if "b" in mode else {"encoding": encoding}
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SFTMixError(
                f"{path}: no space left on the device while writing it; free some disk space (or choose another "
                f"--output_dir) and run the same command again: finished stages are kept and skipped."
            ) from e
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb", encoding=None) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines, atomically."""
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read JSON lines; a bad line raises SFTMixError naming the file and the line number."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTMixError(f"{path}: line {lineno} is not valid JSON ({e.msg}); fix or remove that line.") from e
            if not isinstance(row, dict):
                raise SFTMixError(f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object.")
            rows.append(row)
    return rows


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays show up in metrics; write them as plain numbers/lists
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest checkpoint-* in `folder` whose trainer_state.json (the Trainer writes it last) is readable.

    Why not transformers' get_last_checkpoint: it picks the newest folder by name, so a run killed while saving
    resumes from a half-written checkpoint. Newer, incomplete ones are removed (by the main process) so that
    nothing picks them up later."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, ValueError):
            logging.getLogger("sftmix").warning("%s is incomplete (cut off while saving): ignored and removed", path)
            from accelerate import PartialState

            if PartialState().is_main_process:
                shutil.rmtree(path, ignore_errors=True)
    return None
