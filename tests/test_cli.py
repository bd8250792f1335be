"""The `sftmix` command end to end on configs/smoke.yaml (tiny random model): outputs, rerun, --data, resume after
SIGKILL, one-line errors, and every YAML under configs/ through the real parser."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import sigkill_script

from sftmix.cli import main
from sftmix.config import parse_config
from sftmix.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def sftmix_cmd():
    exe = shutil.which("sftmix")
    return [exe] if exe else [sys.executable, "-m", "sftmix"]


def run_cli(*args, cmd=None, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run((cmd or sftmix_cmd()) + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def check_ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = check_ok(run_cli("run", "--config", SMOKE, "--output_dir", str(out)))
    return out, proc


@pytest.mark.slow
def test_smoke_run_writes_report_confidence_and_both_recipes(smoke_run):
    out, proc = smoke_run
    report = json.loads((out / "report.json").read_text())
    train = read_jsonl(out / "data" / "train.jsonl")
    held = read_jsonl(out / "data" / "heldout.jsonl")
    assert len(train) == 40 and len(held) == 8  # 48 records, heldout: 8
    assert not {r["guid"] for r in train} & {r["guid"] for r in held}

    conf = read_jsonl(out / "confidence.jsonl")
    assert [r["guid"] for r in conf] == [r["guid"] for r in train]  # one row per training example
    assert sum(r["confident"] for r in conf) == 20  # balanced median split
    assert min(r["confidence"] for r in conf if r["confident"]) >= max(r["confidence"] for r in conf
                                                                        if not r["confident"])
    assert all(f"ppl_{k}" in conf[0] for k in (1, 2)) and (out / "dynamics" / "ckpt_2.jsonl").exists()
    assert report["confidence"]["n_confident"] == report["confidence"]["n_unconfident"] == 20

    rows = {r["model"]: r for r in report["comparison"]}
    assert set(rows) == {"start", "sftmix", "ntp"}
    for name in rows:
        assert math.isfinite(rows[name]["heldout_nll"]) and rows[name]["n_examples"] == 8
    for name in ("sftmix", "ntp"):
        assert rows[name]["heldout_nll"] < rows["start"]["heldout_nll"]  # training helped on held-out data
        assert (out / name / "model" / "config.json").exists() and not list((out / name).glob("checkpoint-*"))
    # SFTMix and NTP really differ: Mixup was on for one run only
    assert rows["sftmix"]["heldout_nll"] != rows["ntp"]["heldout_nll"]
    assert report["models"]["sftmix"]["train"]["last_logged"]["mixup_loss"] > 0
    assert report["models"]["ntp"]["train"]["mixup_weight"] == 0

    html = (out / "report.html").read_text()
    # step 1's plots and the training curves, inlined
    assert html.count("data:image/png;base64,") == len(report["confidence"]["plots"]) + 1 >= 3
    assert "SFTMix" in html and "NTP" in html and "src='plots/" not in html  # self-contained
    assert set(report["timings"]) >= {"data", "dynamics", "train:sftmix", "train:ntp", "eval:start", "eval:ntp"}
    assert "Held-out comparison" in proc.stdout and "SFTMix" in proc.stdout  # the printed table

    # config.yaml is the resolved config and reads back through the parser
    cfg = parse_config(["--config", str(out / "config.yaml")])
    assert cfg.run.num_checkpoints == 2 and cfg.train.mixup_weight == 0.2 and cfg.run_dir == out


@pytest.mark.slow
def test_rerun_skips_every_stage(smoke_run):
    out, _ = smoke_run
    stamp = {p: p.stat().st_mtime_ns for p in [out / "report.json", out / "sftmix" / "model" / "model.safetensors",
                                               out / "confidence.jsonl"]}
    proc = check_ok(run_cli("run", "--config", SMOKE, "--output_dir", str(out)))
    for stage in ("data", "dynamics", "train:sftmix", "train:ntp", "eval:start", "eval:sftmix", "eval:ntp", "report"):
        assert f"[sftmix] {stage}" in proc.stderr and "skipped" in proc.stderr.split(f"[sftmix] {stage}")[1]
    assert "running" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert "Held-out comparison" in proc.stdout


@pytest.mark.slow
def test_data_override_with_sharegpt_file(tmp_path):
    # the smoke records as ShareGPT chats, some with a second exchange: expanded into one example per turn
    src = [json.loads(x) for x in (ROOT / "configs" / "data" / "smoke.jsonl").read_text().splitlines()]
    chats = []
    for i in range(0, 40, 2):
        a, b = src[i], src[i + 1]
        conv = [{"from": "human", "value": f"{a['instruction']}\n\n{a['input']}".strip()},
                {"from": "gpt", "value": a["output"]}]
        if i % 4 == 0:
            conv += [{"from": "human", "value": f"{b['instruction']}\n\n{b['input']}".strip()},
                     {"from": "gpt", "value": b["output"]}]
        chats.append({"id": f"c{i}", "conversations": conv})
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(chats))
    out = tmp_path / "run"
    # second turns carry their history: a longer max_length than the smoke's 128 bytes
    # (and online confidence: from the reference's own training passes instead of the scored checkpoints)
    check_ok(run_cli("run", "--config", SMOKE, "--output_dir", str(out), "--data", str(data), "--max_length", "256",
                     "--confidence_mode", "online"))
    report = json.loads((out / "report.json").read_text())
    load = report["data"]["load"]
    assert load["format"] == "sharegpt" and load["n_rows"] == 20 and load["n_records"] == 30
    # whole conversations go to one side, so the held-out side may exceed 8 by a second turn
    assert load["n_train"] + load["n_heldout"] == 30 and 8 <= load["n_heldout"] <= 9
    train_conv = {r["conversation_id"] for r in read_jsonl(out / "data" / "train.jsonl")}
    assert not train_conv & {r["conversation_id"] for r in read_jsonl(out / "data" / "heldout.jsonl")}
    conf = read_jsonl(out / "confidence.jsonl")
    assert len(conf) == load["n_train"] and sum(r["confident"] for r in conf) == load["n_train"] // 2
    online = {r["guid"]: r["online_confidence"] for r in read_jsonl(out / "dynamics" / "online_confidence.jsonl")}
    assert all(r["confidence"] == online[r["guid"]] and "checkpoint_confidence" in r for r in conf)
    assert report["confidence"]["mode"] == "online"
    for r in report["comparison"]:
        assert math.isfinite(r["heldout_nll"])


KILLER = sigkill_script("sftmix", 12)  # in the middle of the SFTMix run, 2 steps after its checkpoint-10


@pytest.mark.slow
def test_sigkill_during_training_then_rerun_resumes_to_the_same_result(smoke_run, tmp_path):
    ref, _ = smoke_run
    out = tmp_path / "run"
    killed = run_cli("run", "--config", SMOKE, "--output_dir", str(out), cmd=[sys.executable, "-c", KILLER])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / "sftmix").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert not (out / "sftmix" / "train_result.json").exists() and not (out / "report.json").exists()
    (out / "sftmix" / "checkpoint-15").mkdir()  # a checkpoint cut off while saving: must be ignored

    proc = check_ok(run_cli("run", "--config", SMOKE, "--output_dir", str(out)))
    assert "dynamics     done already" in proc.stderr
    assert f"resuming from {out / 'sftmix' / 'checkpoint-10'}" in proc.stderr
    result = json.loads((out / "sftmix" / "train_result.json").read_text())
    assert result["resumed_from"].endswith("checkpoint-10") and result["global_step"] == 20

    def final(run):
        losses = [h["loss"] for h in json.loads((run / "sftmix" / "train_result.json").read_text())["log_history"]
                  if "loss" in h]
        nll = json.loads((run / "eval" / "sftmix.json").read_text())["results"]["heldout"]["nll"]
        return losses, nll

    (l_ref, nll_ref), (l_res, nll_res) = final(ref), final(out)
    assert l_res == pytest.approx(l_ref, rel=1e-5, abs=1e-6)
    assert nll_res == pytest.approx(nll_ref, rel=1e-5, abs=1e-6)


def test_missing_data_file_is_one_line_and_exit_code_2(tmp_path):
    proc = run_cli("run", "--config", SMOKE, "--output_dir", str(tmp_path / "r"), "--data", str(tmp_path / "no.json"))
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("sftmix: error: ") and "no.json" in lines[-1] and "no such file" in lines[-1]
    assert "Traceback" not in proc.stderr


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sftmix: error: ")
    return err[-1]


def test_unknown_keys_suggest_the_nearest(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(SMOKE).read_text() + "mixup_wieght: 0.3\n")
    msg = _error(capsys, ["run", "--config", str(bad), "--output_dir", str(tmp_path / "r")])
    assert "unknown setting `mixup_wieght`" in msg and "did you mean `mixup_weight`" in msg and str(bad) in msg
    msg = _error(capsys, ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "r"), "--num_checkpoint", "3"])
    assert "unknown setting `num_checkpoint` (command line)" in msg and "`num_checkpoints`" in msg
    msg = _error(capsys, ["rnu", "--config", SMOKE])
    assert "did you mean `run`" in msg


def test_bad_values_are_one_line_errors(tmp_path, capsys):
    base = ["run", "--config", SMOKE, "--output_dir", str(tmp_path / "r")]
    assert "num_checkpoints" in _error(capsys, base + ["--num_checkpoints", "many"])
    assert "recipes" in _error(capsys, base + ["--recipes", "sftmix", "mixup"])
    assert "mixup_alpha" in _error(capsys, base + ["--mixup_alpha", "0"])
    assert "config file" in _error(capsys, ["run", "--config", str(tmp_path / "none.yaml")])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "mapping" in _error(capsys, ["run", "--config", str(tmp_path / "list.yaml")])


def test_run_directory_with_another_config_is_refused(tmp_path, capsys):
    from sftmix.run.config_file import write_config

    out = tmp_path / "r"
    write_config(parse_config(["--config", SMOKE, "--output_dir", str(out), "--mixup_weight", "0.4"]))
    # before any target run has started, what only the target runs read may still change (issue 25) ...
    write_config(parse_config(["--config", SMOKE, "--output_dir", str(out), "--mixup_weight", "0.5"]))
    (out / "sftmix").mkdir()  # ... not once one has
    msg = _error(capsys, ["run", "--config", SMOKE, "--output_dir", str(out)])
    assert "another config (mixup_weight: 0.5 -> 0.2)" in msg
    # settings that do not change finished stages may change
    write_config(parse_config(["--config", SMOKE, "--output_dir", str(out), "--recipes", "ntp", "--mixup_weight",
                               "0.5"]))


def test_precedence_defaults_yaml_cli_and_eval_fields(tmp_path):
    cfg = parse_config(["--config", SMOKE, "--output_dir", str(tmp_path), "--mixup_weight", "0.7",
                        "--eval_max_length", "64"])
    assert cfg.train.mixup_weight == 0.7  # command line over YAML
    assert cfg.train.learning_rate == 1e-3 and cfg.run.model == "tiny-random:0"  # YAML over defaults
    assert cfg.train.save_total_limit == 2 and cfg.train_values["save_steps"] == 5
    assert cfg.run.data == str(ROOT / "configs" / "data" / "smoke.jsonl")  # found beside the config file
    ev = cfg.eval_config()
    assert ev.max_length == 64 and ev.chat_template == "auto" and ev.seed == cfg.train.seed
    assert ev.heldout_file == str(tmp_path / "data" / "heldout.jsonl") and ev.batch_size == 8
    # without --config, the run directory's own config.yaml is used
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "tiny-random:3", "output_dir": str(tmp_path)}))
    assert parse_config(["--output_dir", str(tmp_path)]).run.model == "tiny-random:3"


def test_default_config_is_the_packaged_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # works from any directory
    cfg = parse_config([])
    assert cfg.run.model == "smollm2" and cfg.run.data.startswith("sharegpt:") and set(cfg.run.recipes) == {
        "sftmix", "ntp"}
    assert "demo.yaml" in cfg.source


def test_shipped_configs_by_name_list_and_copy(tmp_path, monkeypatch, capsys):
    """The package ships every config of configs/ (sftmix/configs is one copy of them): `--config NAME` reads one by
    name from any directory, `sftmix configs` lists them, `configs copy` writes them out for accelerate and globs."""
    from sftmix.config import shipped_configs
    from sftmix.run.sweep import _shipped_or_files

    shipped = shipped_configs()
    assert set(shipped) == {p.relative_to(ROOT / "configs").with_suffix("").as_posix()
                            for p in (ROOT / "configs").rglob("*.yaml")}
    assert {"smoke", "demo", "llama3.1-8b_alpaca", "ablations/baseline", "accelerate/fsdp"} <= set(shipped)
    monkeypatch.chdir(tmp_path)  # no configs/ here
    cfg = parse_config(["--config", "smoke", "--output_dir", "out", "--mixup_weight", "0.3"])
    assert cfg.run.model == "tiny-random:0" and cfg.train.mixup_weight == 0.3
    assert Path(cfg.run.data).is_file()  # data/smoke.jsonl found beside the shipped config
    # README's repository paths work outside the repository, and so does an unexpanded glob or a folder in a sweep
    assert parse_config(["--config=configs/ablations/baseline.yaml", "--output_dir", "o2"]).run.recipes
    assert len(_shipped_or_files(["configs/ablations/*.yaml"])) == len(_shipped_or_files(["ablations"])) == len(
        list((ROOT / "configs" / "ablations").glob("*.yaml")))
    with pytest.raises(SystemExit) as e:
        main(["run", "--config", "smok", "--output_dir", "o3"])
    assert e.value.code == 2 and "did you mean `smoke`?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["configs"])
    listing = capsys.readouterr().out
    assert e.value.code == 0 and all(f"  {n} " in listing for n in shipped)
    with pytest.raises(SystemExit) as e:
        main(["configs", "copy", "accelerate/fsdp", "smoke"])
    assert e.value.code == 0
    assert (tmp_path / "configs" / "accelerate" / "fsdp.yaml").read_bytes() == shipped["accelerate/fsdp"].read_bytes()
    assert (tmp_path / "configs" / "data" / "smoke.jsonl").is_file()  # what smoke.yaml reads comes along
    (tmp_path / "configs" / "smoke.yaml").write_text("model: mine\n")
    with pytest.raises(SystemExit) as e:
        main(["configs", "copy", "smoke"])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err  # a user's edited copy is never overwritten
    assert (tmp_path / "configs" / "smoke.yaml").read_text() == "model: mine\n"


def _sftmix_configs():
    return sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", _sftmix_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses(path, tmp_path):
    first = path.read_text().splitlines()[:2]
    if "overrides" not in path.parts:  # a whole config opens with the command that runs it
        assert first[0].startswith("#") and f"run --config configs/{path.relative_to(ROOT / 'configs')}" in " ".join(
            first), first
    cfg = parse_config(["--config", str(path), "--output_dir", str(tmp_path)])
    assert cfg.run.recipes and cfg.train.per_device_train_batch_size >= 1


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.compute_environment.value == "LOCAL_MACHINE" and cfg.num_processes >= 1


@pytest.mark.slow
def test_stage_commands_reuse_the_run_directory_and_its_config(smoke_run, caplog, capsys):
    import logging

    caplog.set_level(logging.INFO, logger="sftmix")
    out, _ = smoke_run
    before = (out / "report.json").stat().st_mtime_ns
    for argv in (["dynamics"], ["train", "--recipe", "ntp"], ["eval"]):
        caplog.clear()
        with pytest.raises(SystemExit) as e:
            main(argv + ["--output_dir", str(out)])  # no --config: DIR/config.yaml is used
        assert e.value.code == 0
        assert "running" not in caplog.text and "skipped" in caplog.text
    with pytest.raises(SystemExit) as e:
        main(["report", "--output_dir", str(out)])
    assert e.value.code == 0 and (out / "report.json").stat().st_mtime_ns > before  # `report` always rewrites
    assert "Held-out comparison" in capsys.readouterr().out


@pytest.mark.slow
def test_ntp_baseline_reuses_an_identical_reference_run(smoke_run, tmp_path):
    # with reference_epochs = num_train_epochs (2) step 1 *is* the NTP baseline: it is reused, not trained again,
    # and it gives the very model the fixture run trained separately
    ref, _ = smoke_run
    out = tmp_path / "run"
    proc = check_ok(run_cli("run", "--config", SMOKE, "--output_dir", str(out), "--reference_epochs", "2"))
    assert "reusing its final checkpoint" in proc.stderr
    result = json.loads((out / "ntp" / "train_result.json").read_text())
    assert result["reused_reference_checkpoint"].endswith("checkpoint-20") and result["global_step"] == 20
    assert not list((out / "ntp").glob("checkpoint-*"))

    def nll(run):
        return json.loads((run / "eval" / "ntp.json").read_text())["results"]["heldout"]["nll"]

    assert nll(out) == pytest.approx(nll(ref), rel=1e-5, abs=1e-6)
