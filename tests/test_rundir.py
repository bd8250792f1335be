"""sftmix.rundir: the lock that admits one command per run directory, inputs kept out of the run's outputs, and the
content fingerprints that decide whether a finished stage is still valid. Plain files in tmp_path; no model trained
(the whole-run behaviour is in tests/test_reliability.py)."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from sftmix import rundir
from sftmix.run.fingerprints import model_digest
from sftmix.rundir import Fingerprints, RunLock, check_inputs_outside, file_sha256
from sftmix.utils import SFTMixError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def logs(caplog):
    caplog.set_level(logging.INFO, logger="sftmix")
    return caplog


# ----------------------------------------------------------------------------------------------------------- lock


def _hold_in_another_process(run_dir: Path, command: str) -> subprocess.Popen:
    """A process that holds `run_dir`'s RunLock (as a running `sftmix run` does) until it is killed."""
    code = ("import sys, time\n"
            "from sftmix.rundir import RunLock\n"
            f"with RunLock({str(run_dir)!r}, {command!r}):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_command_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, logs):
    holder = _hold_in_another_process(tmp_path, "sftmix run --config other.yaml")
    try:
        with pytest.raises(SFTMixError) as refused:
            RunLock(tmp_path, "sftmix report").__enter__()
        message = str(refused.value)
        assert f"pid {holder.pid} on " in message and "sftmix run --config other.yaml" in message
        assert message.startswith(f"{tmp_path} is in use by another sftmix run") and "\n" not in message
        # trying did not wipe the holder's record: a third command is told the same
        with pytest.raises(SFTMixError, match=f"pid {holder.pid} .*other.yaml"):
            RunLock(tmp_path, "sftmix eval").__enter__()
    finally:
        holder.kill()  # kill -9: it never releases
        holder.wait()
    with RunLock(tmp_path, "sftmix run next") as lock:
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["command"] == "sftmix run next" and lock.path.name == ".lock"
    assert f"took over the lock of {tmp_path} left by pid {holder.pid} (no longer running)" in logs.text
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: nothing for the next holder to take over


def test_the_lock_is_released_when_the_command_fails_and_a_clean_release_is_not_a_takeover(tmp_path, logs):
    with pytest.raises(ValueError):
        with RunLock(tmp_path, "first"):
            raise ValueError("the stage failed")
    with RunLock(tmp_path, "second"):
        pass
    assert "took over" not in logs.text
    assert (tmp_path / ".lock").exists() and (tmp_path / ".lock").read_text() == ""


def test_a_run_directory_that_cannot_hold_the_lock_is_one_error_line(tmp_path):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    with pytest.raises(SFTMixError, match="cannot write in the run directory .*--output_dir") as e:
        RunLock(a_file, "sftmix run").__enter__()
    assert str(a_file) in str(e.value) and "Not a directory" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SFTMixError, match="No such file or directory"):  # the run makes its directory, not the lock
        RunLock(tmp_path / "missing", "sftmix run").__enter__()
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------------------------ inputs outside outputs


@dataclass
class _EvalArgs:  # the shape check_inputs_outside reads: every *_file field is an input
    heldout_file: str | None = None
    pubmedqa_file: str | None = None
    judge_cache_file: str | None = None  # written by the evaluation: never an input
    judge_prompt_dir: str | None = None


def _cfg(run_dir, data, **eval_args):
    run = SimpleNamespace(data=str(data), model="tiny-random", reference_model=None, chat_template=None)
    return SimpleNamespace(run=run, eval_args=_EvalArgs(**eval_args), run_dir=run_dir)


def test_an_input_inside_the_runs_outputs_is_refused_naming_the_setting(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "sftmix").mkdir()
    inside = run_dir / "data" / "train.jsonl"
    inside.write_text("{}\n")
    with pytest.raises(SFTMixError, match=r"^data=.*train.jsonl lies inside the run directory's output .*data"):
        check_inputs_outside(_cfg(run_dir, inside))
    prompts = run_dir / "sftmix" / "prompts"
    prompts.mkdir()
    outside = tmp_path / "train.jsonl"
    outside.write_text("{}\n")
    with pytest.raises(SFTMixError, match="^judge_prompt_dir="):
        check_inputs_outside(_cfg(run_dir, outside, judge_prompt_dir=str(prompts)))


def test_inputs_the_run_may_read_from_its_directory_pass(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    heldout = run_dir / "data" / "heldout.jsonl"  # the evaluation's default: the run's own held-out split
    heldout.write_text("{}\n")
    beside = run_dir / "my_data.jsonl"  # in the folder, but not in anything the run writes
    beside.write_text("{}\n")
    cache = run_dir / "judge_cache.jsonl"  # an output, named by a setting that is not an input
    cache.write_text("")
    check_inputs_outside(_cfg(run_dir, beside, heldout_file=str(heldout), judge_cache_file=str(cache)))
    assert ("heldout_file", str(heldout)) in rundir.input_paths(_cfg(run_dir, beside, heldout_file=str(heldout)))


# ------------------------------------------------------------------------------------------ content fingerprints


def test_file_sha256_is_the_contents_hash_and_its_cache_follows_size_and_mtime(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"a" * (3 << 20))  # more than one 1 MiB chunk
    cache = {}
    assert file_sha256(f, cache) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert cache[str(f.resolve())][:2] == [f.stat().st_size, f.stat().st_mtime_ns]
    f.write_bytes(b"b" * (3 << 20))  # same size, new content: a new mtime invalidates the cached hash
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert file_sha256(f, cache) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_folders_digest_covers_names_and_contents_but_not_hidden_files_or_checkpoints(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\x00" * 64)
    fp = Fingerprints(tmp_path / "run", write=False)
    first = fp.digest(model)
    (model / ".cache").mkdir()
    (model / ".cache" / "x").write_text("noise")
    (model / "checkpoint-5").mkdir()
    (model / "checkpoint-5" / "optimizer.pt").write_bytes(b"1")
    assert fp.digest(model) == first
    (model / "weights.bin").write_bytes(b"\x01" * 64)
    assert fp.digest(model) != first
    (model / "weights.bin").write_bytes(b"\x00" * 64)
    assert fp.digest(model) == first
    (model / "weights.bin").rename(model / "other.bin")
    assert fp.digest(model) != first  # a renamed file is another folder


def test_model_digest_names_what_identifies_the_start_model(tmp_path):
    fp = Fingerprints(tmp_path, write=False)
    assert model_digest(fp, "tiny-random:3") == "tiny-random:3"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    before = model_digest(fp, str(folder))
    assert before == f"hf-dir:{fp.digest(folder)}"
    (folder / "config.json").write_text('{"a": 2}')
    assert model_digest(fp, str(folder)) != before
    assert model_digest(fp, str(tmp_path / "no_such_model.gguf")).startswith("unresolved:")


def test_a_stage_whose_inputs_changed_loses_its_outputs_and_says_what_changed(tmp_path, logs):
    run_dir = tmp_path
    out = run_dir / "sftmix"
    marker = out / "done.json"
    fp = Fingerprints(run_dir)
    assert fp.refresh("sftmix", marker, {"confidence": "aaa", "setting mixup_alpha": 0.5}, clear=[out]) is False
    out.mkdir()
    marker.write_text("{}")
    # a rerun with the same inputs (read back from fingerprints.json) keeps the stage
    again = Fingerprints(run_dir)
    assert again.refresh("sftmix", marker, {"confidence": "aaa", "setting mixup_alpha": 0.5}, clear=[out]) is False
    assert marker.exists()
    # a changed input: the outputs are removed, the log names it, the new inputs are recorded
    changed = Fingerprints(run_dir)
    assert changed.refresh("sftmix", marker, {"confidence": "bbb", "setting mixup_alpha": 0.2}, clear=[out]) is True
    assert not out.exists()
    assert "confidence changed; setting mixup_alpha changed (0.5 -> 0.2) since the last run: rerunning sftmix" \
        in logs.text
    stored = json.loads((run_dir / "fingerprints.json").read_text())["stages"]["sftmix"]
    assert stored == {"confidence": "bbb", "setting mixup_alpha": 0.2}
    # an input no longer read is not a change of what the finished stage read
    out.mkdir()
    assert changed.refresh("sftmix", marker, {"confidence": "bbb"}, clear=[out]) is False and out.exists()


def test_a_reader_that_does_not_write_compares_but_removes_and_records_nothing(tmp_path):
    out = tmp_path / "ntp"
    Fingerprints(tmp_path).refresh("ntp", None, {"data": "1"}, clear=[out])
    out.mkdir()
    before = (tmp_path / "fingerprints.json").read_text()
    reader = Fingerprints(tmp_path, write=False)  # a non-main process
    assert reader.refresh("ntp", None, {"data": "2"}, clear=[out]) is True
    assert out.exists() and (tmp_path / "fingerprints.json").read_text() == before


def test_a_changed_input_without_outputs_is_not_stale_and_a_torn_file_checks_every_stage_afresh(tmp_path):
    fp = Fingerprints(tmp_path)
    fp.refresh("eval", None, {"heldout": "1"}, clear=[tmp_path / "eval"])
    assert fp.refresh("eval", None, {"heldout": "2"}, clear=[tmp_path / "eval"]) is False  # nothing to remove
    (tmp_path / "fingerprints.json").write_text('{"stages": {"eval": ')  # torn
    assert Fingerprints(tmp_path).stages == {}
