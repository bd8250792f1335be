"""The run directory's layout declared once (sftmix.rundir.RunDir), one train_result.json schema, atomic folders.

    pytest tests/test_run_layout.py        # about 20 s (one smoke run with the NTP run reused from step 1)
"""

import ast
import json
from pathlib import Path

import pytest

from sftmix.rundir import TRAIN_RESULT_KEYS, RunDir, read_train_result, write_train_result
from sftmix.utils import SFTMixError, atomic_dir

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")

# A run directory's file names, and the folders joined onto a run directory (`run_dir / "dynamics"`).
FILE_NAMES = {"confidence.jsonl", "train_result.json", "timings.json", "split.json", "self_split.json",
              "schedule.json", "hidden_final.npz", "online_summary.json", "online_records.jsonl", "stats.json",
              "heldout.jsonl", "train.jsonl", "report.json", "report.md", "report.html", "sources.json", "config.yaml",
              "fingerprints.json"}
FOLDERS = {"dynamics", "data", "eval", "plots", "reference", "logs", "model", "adapter", "sftmix", "ntp"}
# Where a name may still be spelled out, and why. The lead empties the first two after merging issue 26's branches.
ALLOWED = {
    "sftmix/rundir.py": "the declaration itself",
    "sftmix/config.py": "below rundir in the layer order: the default heldout_file and rerunning DIR/config.yaml",
}
NOT_A_RUN_DIR = {("sftmix/cli.py", "configs_command")}  # the shipped configs' data/ folder


def _spelled_out(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    funcs = [(n.lineno, n.end_lineno, n.name) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in FILE_NAMES:
            name = node.value
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
              and node.right.value in FOLDERS):
            name = f'/ "{node.right.value}"'
        else:
            continue
        inside = {f for a, b, f in funcs if a <= node.lineno <= b}
        if not any(rel == m and f in inside for m, f in NOT_A_RUN_DIR):
            found.append(f"{rel}:{node.lineno}: {name}")
    return found


def test_run_directory_names_are_spelled_out_only_in_rundir():
    """A file name of the run directory written out anywhere but sftmix.rundir.RunDir is a second declaration that
    can drift from it (the old layout spelled `confidence.jsonl` 18 times in 7 files)."""
    found = []
    for path in sorted((ROOT / "sftmix").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not any(rel.startswith(prefix) for prefix in ALLOWED):
            found += _spelled_out(path, rel)
    assert not found, "use sftmix.rundir.RunDir instead:\n" + "\n".join(found)


def test_the_scan_sees_a_spelled_out_name(tmp_path):
    """The check above is not vacuous: both spellings it looks for are found in a module that uses them."""
    probe = tmp_path / "probe.py"
    probe.write_text('def f(d):\n    return d / "dynamics", d / "confidence.jsonl"\n', encoding="utf-8")
    found = _spelled_out(probe, "sftmix/run/probe.py")
    assert sorted(x.split(": ", 1)[1] for x in found) == ['/ "dynamics"', "confidence.jsonl"]
    assert len(_spelled_out(probe, "sftmix/cli.py")) == 2  # only cli's configs_command is exempt, not any function


def test_run_dir_paths():
    d = RunDir("runs/x")
    assert d.confidence == Path("runs/x/confidence.jsonl")
    assert d.split == Path("runs/x/dynamics/split.json") and d.scores(2) == Path("runs/x/dynamics/ckpt_2.jsonl")
    assert d.model("sftmix") == Path("runs/x/sftmix/model")
    assert d.train_result("ntp") == Path("runs/x/ntp/train_result.json")
    assert d.eval_result("start") == Path("runs/x/eval/start.json")
    assert d.eval_details("start") == Path("runs/x/eval/start")
    assert d.report("html") == Path("runs/x/report.html") and d.log_file == Path("runs/x/logs/sftmix.log")


def test_train_result_has_one_schema_and_reads_old_ones(tmp_path):
    path = tmp_path / "sftmix" / "train_result.json"
    written = write_train_result(path, recipe="sftmix", metrics={"train_loss": 1.5}, global_step=4,
                                 log_history=[{"loss": 1.5, "step": 4}], mixup_weight=0.2)
    assert tuple(json.loads(path.read_text())) == TRAIN_RESULT_KEYS == tuple(written)
    assert written["mixup_weight"] == 0.2 and written["selection"] is None
    with pytest.raises(TypeError, match="mixup_wieght"):  # a typo would write a key no reader looks for
        write_train_result(path, recipe="ntp", metrics={}, global_step=1, log_history=[], mixup_wieght=0.0)
    # the reference run's file as the old code wrote it: four keys
    old = tmp_path / "reference" / "train_result.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"metrics": {"train_loss": 2.0}, "global_step": 3, "n_train_examples": 8,
                               "log_history": []}))
    got = read_train_result(old)
    assert set(TRAIN_RESULT_KEYS) <= set(got) and got["recipe"] is None and got["global_step"] == 3
    assert got["metrics"] == {"train_loss": 2.0}
    assert read_train_result(tmp_path / "missing.json") is None
    (tmp_path / "torn.json").write_text('{"metrics": ')  # damaged by hand: named, not taken for "not trained"
    with pytest.raises(SFTMixError, match="torn.json is not a training result"):
        read_train_result(tmp_path / "torn.json")


def test_atomic_dir_publishes_a_whole_folder_or_nothing(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_text("v1")
    assert (final / "weights.bin").read_text() == "v1" and not tmp.exists()
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:  # killed mid-save: the old folder stays
        (tmp / "weights.bin").write_text("half")
        raise RuntimeError("killed")
    assert (final / "weights.bin").read_text() == "v1"
    with atomic_dir(final) as tmp:  # a leftover PATH.tmp is emptied first
        assert list(tmp.iterdir()) == []
        (tmp / "other.bin").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["other.bin"]
    with atomic_dir(final, publish=False) as tmp:  # another process of a distributed save: no rename of its own
        pass
    assert (final / "other.bin").exists()


def test_every_training_run_writes_the_same_train_result_keys(tmp_path):
    """The target runs and the NTP run reused from step 1 (reference_epochs = num_train_epochs) write one schema; the
    old code wrote three (the reused NTP run had no confidence_source / use_peft / trainable_parameters, the target
    runs no reused_reference_checkpoint)."""
    from sftmix.config import parse_config
    from sftmix.recipe import run

    out = tmp_path / "run"
    cfg = parse_config(["--config", SMOKE, "--output_dir", str(out), "--reference_epochs", "2", "--disable_tqdm",
                        "true"])
    assert run(cfg, "dynamics") == 0 and run(cfg, "train") == 0
    ntp = json.loads((out / "ntp" / "train_result.json").read_text())
    sftmix = json.loads((out / "sftmix" / "train_result.json").read_text())
    assert ntp["reused_reference_checkpoint"], "the setup no longer reuses the reference run: the test checks nothing"
    assert list(ntp) == list(sftmix)
    assert ntp["recipe"] == "ntp" and ntp["use_peft"] is False and sftmix["confidence_source"] == "separate"
    # a run directory from before the one schema: the reused NTP run's and the reference's files as the old code
    # wrote them still make a report (the keys they lack read as None)
    old_keys = {"ntp": ("recipe", "metrics", "global_step", "resumed_from", "reused_reference_checkpoint",
                        "n_train_examples", "selection", "duplicates_per_epoch", "mixup_enabled", "mixup_weight",
                        "log_history"),
                "reference": ("metrics", "global_step", "n_train_examples", "log_history")}
    for name, keys in old_keys.items():
        path = out / name / "train_result.json"
        full = json.loads(path.read_text())
        path.write_text(json.dumps({k: full[k] for k in keys if k in full}))
    assert run(cfg, "report") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["ntp"]["train"]["reused_reference_checkpoint"] == ntp["reused_reference_checkpoint"]
    assert report["models"]["ntp"]["train"]["global_step"] == ntp["global_step"]
    assert "NTP (= the reference run)" in report["curves"]["runs"]
