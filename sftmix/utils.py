"""Small shared helpers: the project's error type and atomic file output.

    from sftmix.utils import SFTMixError, atomic_write_json, write_jsonl, read_jsonl
    write_jsonl("run/confidence.jsonl", rows)      # tmp file + fsync + rename: never half-written
    with atomic_dir("run/sftmix/model") as tmp: ...  # a folder: filled in model.tmp, renamed when complete
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
def one_line_errors(prog: str):
    """The error exit of every entry point (sftmix, python -m sftmix.eval.evaluate, the benchmarks): an SFTMixError (a
    user's mistake) becomes one line `PROG: error: ...` on stderr and exit code 2, Ctrl-C a line saying how to go on
    and code 130; anything else (a bug) keeps its traceback.

        with one_line_errors("sftmix"):
            code = run_command(argv)"""
    import sys

    try:
        yield
    except SFTMixError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to continue where it stopped.", file=sys.stderr)
        sys.exit(130)


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
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:  # line by line, so that a bad byte is reported at its own line
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SFTMixError(f"{path}: line {lineno} is not UTF-8 text ({e.reason}); save the file as "
                                  f"UTF-8.") from e
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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, publish: bool = True) -> Iterator[Path]:
    """A folder written whole or not at all: yields an empty `PATH.tmp` to fill; on success it replaces `path`.

        with atomic_dir(out / "model", publish=is_main) as tmp:   # a saved model, copied files, ...
            model.save_pretrained(tmp)

    Why: a stage counts as done when its output exists, so a run killed while saving must not leave a half-written
    `path`. publish=False (the other processes of a distributed save, which write into the same folder) neither
    clears nor renames: only the process that publishes does."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if publish:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    yield tmp
    if publish:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays show up in metrics; write them as plain numbers/lists
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None when it is complete.

    Complete: trainer_state.json (the Trainer writes it last) parses; the model weights are there and whole (each
    .safetensors file's header parses and the file is as long as the header says: a truncated copy is caught); the
    optimizer, the LR scheduler and the RNG states are there and readable (torch.save files are zip archives, whose
    directory sits at the end, so a cut-off file does not open). DeepSpeed / FSDP checkpoints keep the optimizer in
    their own folders; those are accepted as they are."""
    import zipfile

    path = Path(path)
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable (cut off while saving)"
    files = {p.name: p for p in path.iterdir() if p.is_file()}
    sharded = any(p.is_dir() and (p.name.startswith("global_step") or "fsdp" in p.name) for p in path.iterdir())
    weights = [p for n, p in files.items() if n.endswith(".safetensors")]
    weights += [p for n, p in files.items() if re.fullmatch(r"(pytorch_model|adapter_model)(-\d+-of-\d+)?\.bin", n)]
    if not weights and not sharded:
        return "no model weights (model.safetensors)"
    for w in weights:
        problem = safetensors_problem(w) if w.suffix == ".safetensors" else None
        if problem:
            return f"{w.name} {problem}"
    needed = [("optimizer.pt", "optimizer"), ("scheduler.pt", "LR scheduler")] if not sharded else []
    needed.append(("rng_state", "RNG state"))
    for name, what in needed:
        found = [p for n, p in files.items()
                 if n == name or name == "rng_state" and re.fullmatch(r"rng_state(_\d+)?\.pth", n)]
        if not found:
            return f"{name if name != 'rng_state' else 'rng_state.pth'} ({what}) is missing"
        for f in found:
            if not os.access(f, os.R_OK):
                return f"{f.name} ({what}) is not readable (permissions)"
            try:
                if zipfile.is_zipfile(f):
                    zipfile.ZipFile(f).close()
                else:
                    with open(f, "rb") as fh:  # torch.save's legacy (pre-zip) format is a pickle: b"\x80" first
                        if fh.read(1) != b"\x80":
                            raise zipfile.BadZipFile("neither a zip archive nor a pickle")
            except (OSError, zipfile.BadZipFile):
                return f"{f.name} ({what}) is truncated or corrupt"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file: 8-byte little-endian header length, a JSON header, then the tensors' bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                return "is truncated (shorter than its header)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"is not readable ({e.strerror})"
    except ValueError:
        return "has a corrupt header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    if 8 + n + max(ends, default=0) > size:
        return f"is truncated ({size} bytes, its header needs {8 + n + max(ends)})"
    return None


def checkpoints(folder: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """(path, problem or None) of every checkpoint-* in `folder`, newest first. Reads only."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    return [(p, checkpoint_problem(p)) for _, p in found]


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest complete checkpoint-* in `folder` (see checkpoint_problem), or None. Reads only: removing the
    torn ones is remove_torn_checkpoints' job.

    Why not transformers' get_last_checkpoint: it picks the newest folder by name, so a run killed while saving
    resumes from a half-written checkpoint."""
    return next((str(p) for p, problem in checkpoints(folder) if problem is None), None)


def remove_torn_checkpoints(folder: str | os.PathLike) -> list[str]:
    """Remove the incomplete checkpoints newer than the newest complete one (so that nothing picks them up later);
    main process only. Returns what was removed."""
    from accelerate import PartialState

    removed = []
    for path, problem in checkpoints(folder):
        if problem is None:
            break
        if PartialState().is_main_process:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(str(path))
    return removed


def resume_checkpoint(folder: str | os.PathLike, what: str) -> str | None:
    """The checkpoint to resume `what` from: the newest complete one. Says which it used and why newer ones were
    skipped, and removes those (they were cut off while saving or are damaged)."""
    log = logging.getLogger("sftmix")
    found = checkpoints(folder)
    for path, problem in found:
        if problem is None:
            break
        log.warning("%s: %s is incomplete (%s): skipped and removed", what, path, problem)
    remove_torn_checkpoints(folder)
    last = next((str(p) for p, problem in found if problem is None), None)
    if last:
        log.info("%s: resuming from %s", what, last)
    elif found:
        log.warning("%s: no complete checkpoint in %s: training starts over", what, folder)
    return last
