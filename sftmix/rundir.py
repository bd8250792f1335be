"""The run directory: its layout (every file name, declared once), one run at a time, inputs never inside its
outputs, stage fingerprints, and the one train_result.json schema.

    from sftmix import rundir
    d = rundir.RunDir(cfg.run_dir)                        # d.train, d.confidence, d.model("sftmix"), d.report("html")
    rundir.write_train_result(d.train_result("ntp"), recipe="ntp", metrics=..., global_step=..., log_history=...)
    with rundir.RunLock(cfg.run_dir, "sftmix run ..."):   # a second run on DIR: SFTMixError naming the holder
        rundir.check_inputs_outside(cfg)                  # a data/eval/template/model path inside DIR's outputs
        fp = rundir.Fingerprints(cfg.run_dir)
        fp.refresh("data", marker, {"data file x.jsonl": fp.digest("x.jsonl")}, clear=[DIR / "data"])

Lock: filelock.FileLock (flock) on DIR/.lock, which holds the holder's pid, host and command. The kernel releases a
flock when its process dies, so a lock left by a killed run (kill -9) is simply taken over (and the log says so).
Fingerprints: DIR/fingerprints.json maps each stage to the content hashes of what it read (data file, training
split, confidence, model weights, evaluation files) plus any setting that may change on a finished run (the
evaluation settings). A stage's fingerprint is recorded when it starts; if the inputs differ on a later invocation,
the stage's outputs are removed (so nothing resumes from a stale checkpoint) and it runs again, saying what changed.
File hashes are sha256, read in 1 MiB chunks, cached in the same file by (path, size, mtime) so reruns stay fast.
Several processes or nodes: `check_shared_run_dir` refuses a run directory that not every process sees (only the
global main process writes it; the lock and fingerprints are its alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import filelock

from sftmix.utils import SFTMixError, atomic_write_json, atomic_write_text

log = logging.getLogger("sftmix")

LOCK_NAME = ".lock"
FINGERPRINTS = "fingerprints.json"
# What a run writes in its directory (besides config.yaml, which reruns read on purpose): no input may lie there.
# (The names come from RunDir, the layout's one declaration, at the end of this module.)


# ----------------------------------------------------------------------------------------------------------------
# lock


_CANNOT_OPEN = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.ENOSPC, errno.EDQUOT}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock of a run directory for the life of one command (see the module docstring).

    filelock.FileLock, i.e. flock(2) on DIR/.lock, not SoftFileLock: the kernel drops a flock when its process dies,
    so a killed run's lock is taken over at once, whereas a soft lock (the file's existence) would outlive kill -9 and
    need a hand-removed file or a lifetime shorter than a training run. Networked run directories (which
    check_shared_run_dir requires for several nodes) keep it: Linux maps flock to NFS byte-range locks. The holder's
    pid, host and command are written into the locked file itself (filelock leaves its contents to the holder), so a
    refused command can name it."""

    def __init__(self, run_dir: str | os.PathLike, command: str):
        self.path = Path(run_dir) / LOCK_NAME
        self.command = command
        # timeout=0: a second command is refused at once, never queued behind a run of hours; on_acquired hands us the
        # locked descriptor (and keeps filelock from a silent soft fallback on a file system without flock)
        self.lock = filelock.FileLock(self.path, timeout=0, on_acquired=self._claim)

    def __enter__(self):
        if not self.path.parent.is_dir():  # filelock would create it: the run makes its directory, not the lock
            raise self._unwritable(errno.ENOTDIR if self.path.parent.exists() else errno.ENOENT)
        try:
            self.lock.acquire()
        except filelock.Timeout:
            holder = self._read()
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}: "
                   f"{holder.get('command')}") if holder else "another process"
            raise SFTMixError(f"{self.path.parent} is in use by another sftmix run ({who}); wait for it to finish, "
                              f"or use another --output_dir.") from None
        except OSError as e:  # the lock file cannot be made or opened (flock's own failures propagate as before)
            if e.errno not in _CANNOT_OPEN:
                raise
            raise self._unwritable(e.errno) from e
        return self

    def _unwritable(self, code: int) -> SFTMixError:
        return SFTMixError(f"{self.path.parent}: cannot write in the run directory ({os.strerror(code)}); choose "
                           f"another --output_dir or fix its permissions.")

    def _claim(self, fd: int) -> None:
        """Called with the lock just taken: say whose lock it replaces, then write ours."""
        old = self._read(fd)
        if old.get("pid"):
            same_host = old.get("host") == socket.gethostname()
            state = "no longer running" if same_host and not _alive(int(old["pid"])) else "its lock was released"
            log.info("[sftmix] took over the lock of %s left by pid %s (%s)", self.path.parent, old["pid"], state)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)

    def _read(self, fd: int | None = None) -> dict:
        try:
            if fd is None:
                data = self.path.read_bytes()[:4096]
            else:
                data = os.pread(fd, 4096, 0)
            return json.loads(data) if data.strip() else {}
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc):
        if self.lock.is_locked:
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)  # released cleanly: the next holder has nothing to take over
            self.lock.release()
        return False


# ----------------------------------------------------------------------------------------------------------------
# one run directory for all processes (several nodes)

SHARED_CHECK = ".shared-check"


def check_shared_run_dir(run_dir: str | os.PathLike, wait_s: float = 10.0) -> None:
    """Refuse a run directory that some process does not share with the main process (node-local disks, or a
    relative --output_dir resolved in each node's own working folder). Collective: every process calls it.

    Why: only the global main process writes the run directory (data split, step 1, models, fingerprints); the
    others read what it wrote (train.jsonl, confidence.jsonl, checkpoints to resume from). On a node that does not
    see the same folder they would read nothing or stale files, so node-local run directories are not supported.
    The main process writes a fresh token; each process must read it back within `wait_s` (a network file system
    may show a new file a little late); a failure anywhere is raised on every process, so that none waits forever."""
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1 or not dist.is_initialized():
        return
    path = Path(run_dir) / SHARED_CHECK
    token = [f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}" if state.is_main_process else None]
    if state.is_main_process:
        atomic_write_text(path, token[0])
    dist.broadcast_object_list(token, src=0)  # after the write: whoever reads the token may look for the file
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = path.read_text(encoding="utf-8") == token[0]
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    views = [None] * state.num_processes
    dist.all_gather_object(views, (seen, socket.gethostname(), str(Path(run_dir).resolve())))
    if state.is_main_process:
        with contextlib.suppress(OSError):
            path.unlink()
    blind = [(rank, host, where) for rank, (ok, host, where) in enumerate(views) if not ok]
    if blind:
        rank, host, where = blind[0]
        raise SFTMixError(f"--output_dir {run_dir} is not shared by all processes: process {rank} on {host} does not "
                          f"see what the main process ({views[0][1]}) writes there ({len(blind)} of "
                          f"{len(views)} processes, e.g. at {where}); put --output_dir on a file system every node "
                          f"mounts, as an absolute path (node-local run directories are not supported).")


# ----------------------------------------------------------------------------------------------------------------
# inputs inside the outputs


def input_paths(cfg) -> list[tuple[str, str]]:
    """(setting, path) of every local path a run reads (data, evaluation sets, templates, models)."""
    run, ev = cfg.run, cfg.eval_args
    out = [("data", run.data), ("model", run.model), ("reference_model", run.reference_model),
           ("chat_template", run.chat_template)]
    for f in ev.__dataclass_fields__:
        if f.endswith("_file") and f != "judge_cache_file" or f in ("eval_chat_template", "judge_prompt_dir"):
            out.append((f, getattr(ev, f)))
    for name in ("split_column_file", "confidence_file"):  # any later confidence-file setting is an input too
        if hasattr(run, name):
            out.append((name, getattr(run, name)))
    return [(k, str(v)) for k, v in out if isinstance(v, (str, os.PathLike)) and v and Path(v).exists()]


def check_inputs_outside(cfg) -> None:
    """Refuse an input path that lies in what the run writes (DIR/data/, DIR/sftmix/, DIR/report.md, ...)."""
    root = Path(cfg.run_dir).resolve()
    layout = RunDir(root)
    outputs = layout.outputs()
    default_heldout = layout.heldout  # the eval default itself, read on purpose
    for key, value in input_paths(cfg):
        p = Path(value).resolve()
        if key == "heldout_file" and p == default_heldout:
            continue
        for o in outputs:
            if p == o or o in p.parents:
                raise SFTMixError(f"{key}={value} lies inside the run directory's output {o}, which this run "
                                  f"writes (it would be overwritten or read back as its own result); move the file "
                                  f"out of {root} or use another --output_dir.")


# ----------------------------------------------------------------------------------------------------------------
# content hashes and stage fingerprints


_MEMO: dict[str, list] = {}  # this process's file hashes, shared by every Fingerprints instance


def file_sha256(path: str | os.PathLike, hashes: dict | None = None) -> str:
    """sha256 of one file's content, read in 1 MiB chunks; memoised by (path, size, mtime) in this process and in
    `hashes` (a run directory's persistent cache)."""
    hashes = {} if hashes is None else hashes
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    for cached in (hashes.get(key), _MEMO.get(key)):
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            hashes[key] = cached
            return cached[2]
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise SFTMixError(f"{p}: cannot read the file ({e.strerror}); check its permissions.") from e
    hashes[key] = _MEMO[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return h.hexdigest()


class Fingerprints:
    """DIR/fingerprints.json: {"stages": {stage: {input: digest}}, "hashes": {path: [size, mtime_ns, sha256]}}."""

    def __init__(self, run_dir: str | os.PathLike, write: bool = True):
        self.path = Path(run_dir) / FINGERPRINTS
        self.write = write  # False on non-main processes: they compare but never write
        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        except (OSError, ValueError):
            data = {}  # a torn or foreign file: every stage is checked afresh
        self.stages: dict = data.get("stages") or {}
        self.hashes: dict = data.get("hashes") or {}

    def _save(self) -> None:
        if self.write:
            atomic_write_json(self.path, {"stages": self.stages, "hashes": self.hashes})

    def file_digest(self, path: str | os.PathLike) -> str:
        return file_sha256(path, self.hashes)

    def digest(self, path: str | os.PathLike) -> str:
        """sha256 of a file, or of a folder's files (relative names and contents; hidden files and Trainer
        checkpoint folders left out)."""
        p = Path(path)
        if not p.is_dir():
            return self.file_digest(p)
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            rel = f.relative_to(p)
            if any(part.startswith(".") or part.startswith("checkpoint-") for part in rel.parts):
                continue
            h.update(f"{rel.as_posix()}\x1f{self.file_digest(f)}\x1e".encode())
        return h.hexdigest()

    def refresh(self, stage: str, marker: Path | None, inputs: dict, clear=(), force_reason: str | None = None) -> bool:
        """Record `inputs` for `stage`; if they differ from those of the earlier run, remove `clear` (the stage's
        outputs, its done marker included) so that it runs again, and say what changed. Returns True if stale."""
        inputs = json.loads(json.dumps(inputs, default=str))
        old = self.stages.get(stage)
        changed = []
        if old is not None:
            # what is read now and was not, or differently; an input gone missing (a deleted confidence.jsonl that
            # is rebuilt later) is not a change of what the finished stage read
            changed = [k for k in sorted(inputs) if old.get(k) != inputs[k]]
        has_output = any(Path(c).exists() for c in clear) or (marker is not None and marker.exists())
        stale = bool(changed or force_reason) and has_output
        if stale:
            why = force_reason or "; ".join(_describe(k, old, inputs) for k in changed[:4])
            log.warning("[sftmix] %s since the last run: rerunning %s", why, stage)
            if self.write:
                for c in clear:
                    c = Path(c)
                    if c.is_dir():
                        shutil.rmtree(c, ignore_errors=True)
                    elif c.exists():
                        c.unlink()
        if old != inputs:
            self.stages[stage] = inputs
            self._save()
        elif stale or self.write and not self.path.exists():
            self._save()
        return stale


def _describe(key: str, old: dict, new: dict) -> str:
    if key not in old:
        return f"{key} is new"
    if key not in new:
        return f"{key} is no longer used"
    if key.startswith("setting "):
        return f"{key} changed ({old[key]!r} -> {new[key]!r})"
    return f"{key} changed"


# ----------------------------------------------------------------------------------------------------------------
# the layout: every file name of a run directory, declared once


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one run directory, by role (every stage, the report, the sweep and the benchmarks name them here).

        d = RunDir(cfg.run_dir)
        d.train, d.confidence, d.split, d.model("sftmix"), d.train_result("ntp"), d.eval_result("start")
    """

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # the run
    @property
    def config(self) -> Path:  # the resolved config (written first; a rerun compares against it)
        return self.root / "config.yaml"

    @property
    def sources(self) -> Path:  # the commit sha of every Hub model and dataset
        return self.root / "sources.json"

    @property
    def fingerprints(self) -> Path:
        return self.root / FINGERPRINTS

    @property
    def timings(self) -> Path:  # each stage's wall time
        return self.root / "timings.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / "sftmix.log"

    # data
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def heldout(self) -> Path:
        return self.data / "heldout.jsonl"

    @property
    def data_stats(self) -> Path:  # the data stage's done marker
        return self.data / "stats.json"

    def tokenize_stats(self, name: str) -> Path:  # name: "reference" or "target" (whose tokenizer)
        return self.data / f"tokenize_{name}.json"

    # step 1
    @property
    def reference(self) -> Path:  # the reference run (its Trainer checkpoints, train_result.json)
        return self.root / "reference"

    @property
    def dynamics(self) -> Path:  # the scores at each scoring step and what step 1 derives from them
        return self.root / "dynamics"

    @property
    def split(self) -> Path:  # step 1's done marker
        return self.dynamics / "split.json"

    @property
    def self_split(self) -> Path:  # one-run SFTMix (reference=self) marks its split here
        return self.dynamics / "self_split.json"

    @property
    def schedule(self) -> Path:  # the scoring steps
        return self.dynamics / "schedule.json"

    def scores(self, k: int) -> Path:  # the rows scored at scoring step k
        return self.dynamics / f"ckpt_{k}.jsonl"

    @property
    def hidden_final(self) -> Path:  # the reference's last hidden states (pairing=nearest, the hidden map)
        return self.dynamics / "hidden_final.npz"

    @property
    def online_summary(self) -> Path:
        return self.dynamics / "online_summary.json"

    @property
    def online_records(self) -> Path:
        return self.dynamics / "online_records.jsonl"

    @property
    def confidence(self) -> Path:  # one row per training example: confidence, variability, confident
        return self.root / "confidence.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    # steps 2-3: one folder per recipe
    def recipe(self, name: str) -> Path:
        return self.root / name

    def model(self, name: str) -> Path:  # the published model of a recipe (merged, if trained with LoRA)
        return self.root / name / "model"

    def adapter(self, name: str) -> Path:  # a LoRA run's adapter, beside its merged model
        return self.root / name / "adapter"

    def train_result(self, name: str) -> Path:  # a training run's done marker (schema: write_train_result)
        return self.root / name / "train_result.json"

    # evaluation and report
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_result(self, name: str) -> Path:  # one model's metrics: the eval stage's done marker for it
        return self.eval / f"{name}.json"

    def eval_details(self, name: str) -> Path:  # one model's predictions and per-example rows
        return self.eval / name

    @property
    def judge_cache(self) -> Path:
        return self.root / "judge_cache.jsonl"

    def report(self, ext: str) -> Path:  # ext: "md", "json" or "html"
        return self.root / f"report.{ext}"

    def outputs(self, recipes=("sftmix", "ntp")) -> list[Path]:
        """What a run writes here (config.yaml aside: reruns read it on purpose); no input may lie inside."""
        return [self.data, self.reference, self.dynamics, self.plots, self.eval, *map(self.recipe, recipes),
                self.confidence, self.report("md"), self.report("json"), self.report("html"), self.timings,
                self.fingerprints, self.root / LOCK_NAME, self.judge_cache]


# ----------------------------------------------------------------------------------------------------------------
# train_result.json: a training run's done marker and summary, one schema for every run that writes one

TRAIN_RESULT_KEYS = ("recipe", "metrics", "global_step", "resumed_from", "reused_reference_checkpoint",
                     "n_train_examples", "selection", "duplicates_per_epoch", "mixup_enabled", "mixup_weight",
                     "confidence_source", "self_confidence", "use_peft", "trainable_parameters", "log_history")


def write_train_result(path: str | os.PathLike, *, recipe: str | None, metrics: dict, global_step: int,
                       log_history: list, **fields) -> dict:
    """Write a train_result.json (atomically): the keys of TRAIN_RESULT_KEYS, None where a run has no value (the
    reference run has no recipe, an NTP run no Mixup weight). Returns what it wrote."""
    unknown = set(fields) - set(TRAIN_RESULT_KEYS)
    if unknown:  # a typo would write a key no reader looks for
        raise TypeError(f"write_train_result: unknown fields {sorted(unknown)}")
    given = {"recipe": recipe, "metrics": metrics, "global_step": global_step, "log_history": log_history, **fields}
    result = {k: given.get(k) for k in TRAIN_RESULT_KEYS}
    atomic_write_json(path, result)
    return result


def read_train_result(path: str | os.PathLike) -> dict | None:
    """A train_result.json, None if absent. Old run directories wrote fewer keys (the reference's had no recipe, a
    reused NTP run no confidence_source): every key of TRAIN_RESULT_KEYS is present, None if missing."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        data = e
    if not isinstance(data, dict):  # written atomically: a damaged one was edited or copied by hand
        raise SFTMixError(f"{path} is not a training result (a JSON object): {data!s:.80}; delete it (that run "
                          f"trains again) or restore it.")
    out = {k: data.get(k) for k in TRAIN_RESULT_KEYS}
    out["metrics"] = out["metrics"] or {}
    out["log_history"] = out["log_history"] or []
    return {**data, **out}
