"""The catalogue of bad inputs (issue 6): each gives one line through the `sftmix` entry point, exit code 2, no
traceback, naming the file/record and the fix. Run with `-s` to print every message (they are quoted in the docs)."""

import errno
import json
import os
from pathlib import Path

import pytest

from sftmix.cli import main
from sftmix.utils import SFTMixError, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err and err[-1].startswith("sftmix: error: ")
    assert not any("Traceback" in x for x in err)
    print(f"\n{argv[-1] if argv[-2] == '--data' else ' '.join(argv[-2:])}\n    {err[-1]}")
    return err[-1]


def data_cases(tmp_path):
    """(name, file content or None for missing, expected fragments of the message)."""
    jl = lambda rows: "\n".join(json.dumps(r) for r in rows) + "\n"  # noqa: E731
    return [
        ("missing.json", None, ["missing.json", "no such file"]),
        ("empty.json", "", ["empty.json", "empty"]),
        ("bad_line.jsonl", jl([GOOD]) + '{"instruction": "x", "output": \n', ["bad_line.jsonl", "line 2"]),
        ("bad_array.json", '[{"instruction": "x", "output": "y"},', ["bad_array.json"]),
        ("no_output.jsonl", jl([GOOD, {"instruction": "x", "input": ""}]), ["no_output.jsonl", "2"]),
        ("wrong_type.jsonl", jl([GOOD, {"instruction": "x", "input": "", "output": ["a", "b"]}]),
         ["wrong_type.jsonl", "2"]),
        ("empty_response.jsonl", jl([GOOD, {"instruction": "x", "input": "", "output": "   "}]),
         ["empty_response.jsonl", "2"]),
        ("unknown_format.jsonl", jl([{"question": "q", "answer": "a"}]), ["unknown_format.jsonl"]),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_data_files(tmp_path, capsys, case):
    name, content, fragments = data_cases(tmp_path)[case]
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    msg = one_line_error(capsys, ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "r"), "--data", str(path)])
    for frag in fragments:
        assert frag.lower() in msg.lower(), (frag, msg)


def test_unreadable_data_path(tmp_path, capsys):
    folder = tmp_path / "a_folder.json"
    folder.mkdir()
    msg = one_line_error(capsys, ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "r"), "--data", str(folder)])
    assert "a_folder.json" in msg


def test_prompts_filling_max_length_are_refused_past_the_threshold(tmp_path, capsys):
    rows = [{"instruction": "word " * 200, "input": "", "output": f"answer {i}"} for i in range(40)]
    path = tmp_path / "long_prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    msg = one_line_error(capsys, ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "r"), "--data", str(path)])
    assert "max_length" in msg and "long_prompts" in msg


def test_missing_model_path(tmp_path, capsys):
    msg = one_line_error(capsys, ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "r"),
                                  "--model", str(tmp_path / "no_model")])
    assert "no_model" in msg and "does not exist" in msg


def test_hub_id_not_in_the_local_cache(tmp_path, capsys, monkeypatch):
    # (a tokenizer with no chat template under chat_template=model: tests/test_data.py)
    # offline: Hub ids download when online since issue 12 (tests/test_hub.py, against a loopback stand-in)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    msg = one_line_error(capsys, ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "r"),
                                  "--model", "gpt2-not-cached/none"])
    assert "gpt2-not-cached/none" in msg and "hf download gpt2-not-cached/none" in msg


def test_nearest_pairing_with_a_column_split_is_refused_before_any_stage(tmp_path, capsys):
    # nearest pairing needs step 1's hidden states; a column split skips step 1, so nothing may train first
    msg = one_line_error(capsys, ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "r"),
                                  "--data", str(ROOT / "configs" / "data" / "smoke_labeled.jsonl"),
                                  "--split_source", "column", "--split_column", "quality",
                                  "--pairing", "nearest"])
    assert "pairing=nearest" in msg and "split_source=dynamics" in msg
    assert not (tmp_path / "r" / "ntp").exists() and not (tmp_path / "r" / "data").exists()


def test_no_space_left_is_one_clear_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "confidence.jsonl"
    target.write_text("old complete content\n")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    with pytest.raises(SFTMixError, match="no space left") as e:
        atomic_write_text(target, "new content")
    assert str(target) in str(e.value)
    monkeypatch.undo()
    assert target.read_text() == "old complete content\n"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["confidence.jsonl"]  # no temporary left behind


def test_data_on_bad_skip_counts_instead_of_failing(tmp_path):
    from sftmix.config import parse_config
    from sftmix.data import load_records_with_stats

    path = tmp_path / "two_bad.jsonl"
    rows = [GOOD, {"instruction": "x", "input": "", "output": " "}, {"instruction": "y", "input": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = parse_config(["--config", SMOKE, "--output_dir", str(tmp_path / "r"), "--data_on_bad", "skip"])
    assert cfg.run.data_on_bad == "skip"
    records, stats = load_records_with_stats(str(path), on_bad=cfg.run.data_on_bad)
    assert len(records) == 1 and stats["n_skipped_rows"] == 2


def test_a_file_named_sharegpt_follows_data_on_bad(tmp_path, capsys, monkeypatch):
    """Only the `sharegpt[:N]` spec of the pip package skips its known bad rows; a local file whose name merely starts
    with "sharegpt" stops at a bad row under the default data_on_bad=error."""
    from sftmix.data import is_sharegpt_package

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sharegpt_clean.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"instruction": "x", "input": "", "output": " "}) + "\n")
    assert is_sharegpt_package("sharegpt:20") and is_sharegpt_package("sharegpt")
    assert not is_sharegpt_package("sharegpt_clean.jsonl") and not is_sharegpt_package(str(path))
    msg = one_line_error(capsys, ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "run"), "--data",
                                  "sharegpt_clean.jsonl"])
    assert "sharegpt_clean.jsonl" in msg and "line 2" in msg
