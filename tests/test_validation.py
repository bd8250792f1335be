"""Issue 25, every mistake caught before anything trains: one-run SFTMix settings checked before the first stage of
the command, YAML values checked against the settings' types, models without a tokenizer and blank model names,
run directories that do not exist, text that cannot be encoded, and the smaller cases (advice for all-identical
data, lists of Hub ids, the report's loss and time over a resumed run, sweep errors). Tiny random model
(configs/smoke.yaml); each refusal is one line and leaves nothing trained."""

from pathlib import Path

import pytest

from sftmix.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
DATA = ROOT / "configs" / "data" / "smoke.jsonl"


def cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------- one-run settings, before any stage trains

# recipes: ntp first, so that a late refusal would come after the NTP recipe has trained (what the issue saw)
ONE_RUN = ["--reference", "self", "--recipes", "ntp", "sftmix", "--disable_tqdm", "true"]
ONE_RUN_BAD = [
    (["--num_train_epochs", "1"], "needs num_train_epochs greater than self_ntp_epochs=1"),
    (["--num_train_epochs", "2.5"], "needs a whole num_train_epochs"),
    (["--max_steps", "4"], "unset max_steps (got max_steps=4)"),
    (["--mixup_weight", "0"], "mixup_weight=0 turns Mixup off"),
    (["--pairing", "nearest"], "needs pairing=random"),
    (["--self_ntp_epochs", "2"], "needs num_train_epochs greater than self_ntp_epochs=2"),
    (["--self_confidence", "checkpoints", "--self_num_checkpoints", "50"], "self_num_checkpoints=50 scoring passes"),
]


def test_what_the_mixup_trainer_refuses_is_refused_before_step_1(tmp_path, capsys):
    from sftmix.models import build_byte_tokenizer, build_tiny_model

    # a model that soft-caps its logits (as Gemma-2) cannot be the Mixup target: step 1 would train for nothing
    folder = tmp_path / "softcapped"
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=1)
    model.config.final_logit_softcapping = 30.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    for extra, message in ((["--model", folder], f"model={folder}: the model uses final logit soft-capping"),
                           (["--packing", "true"], "packing and padding_free are not supported by SFTMix")):
        out = tmp_path / "run"
        code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, "--max_steps", "2",
                        "--recipes", "ntp", "sftmix", *extra)
        assert code == 2 and message in err, err[-2000:]
        assert one_line(err) and not (out / "data").exists()


@pytest.mark.parametrize("args,message", ONE_RUN_BAD, ids=[m for _, m in ONE_RUN_BAD])
def test_one_run_settings_are_refused_before_any_recipe_trains(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, *ONE_RUN, *args)
    assert code == 2 and message in err, err[-2000:]
    assert one_line(err)
    assert "self_reference_epochs" not in err  # the trainer's name, not the user's
    assert "reference=self (one-run SFTMix)" in err or "self_num_checkpoints" in err
    assert not (out / "ntp").exists() and not (out / "sftmix").exists()  # nothing trained


def test_a_refusal_after_the_data_stage_is_corrected_on_the_same_directory(tmp_path, capsys):
    out = tmp_path / "run"
    one_run = ["--reference", "self", "--recipes", "sftmix", "--self_confidence", "checkpoints", "--disable_tqdm",
               "true"]
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, *one_run, "--self_num_checkpoints", "50")
    assert code == 2 and "self_num_checkpoints=50 scoring passes" in err
    assert (out / "data" / "train.jsonl").exists() and not (out / "sftmix").exists()  # the data stage, no training
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, *one_run, "--self_num_checkpoints", "2")
    assert code == 0, err[-2000:]  # not "holds a run made with another config"
    assert (out / "sftmix" / "train_result.json").exists()


# ---------------------------------------------------------------------------------------------- YAML value types


def _yaml(tmp_path, *lines, duplicate=False) -> Path:
    """configs/smoke.yaml (its data path made absolute) with `lines` in place of its lines of the same keys, or
    appended (`duplicate`: appended in any case)."""
    text = Path(SMOKE).read_text().replace("data: data/smoke.jsonl", f"data: {DATA}").splitlines()
    for line in lines:
        key = line.split(":")[0] + ":"
        at = [i for i, old in enumerate(text) if old.startswith(key)]
        if at and not duplicate:
            text[at[0]] = line
        else:
            text.append(line)
    p = tmp_path / "my config.yaml"
    p.write_text("\n".join(text) + "\n")
    return p


YAML_BAD = [  # (line, message, appended even though the smoke config sets that key)
    ("self_ntp_epochs: 1.5", "`self_ntp_epochs` (config file {path}) expects a whole number, got 1.5", False),
    ("num_checkpoints: 2.5", "`num_checkpoints` (config file {path}) expects a whole number, got 2.5", False),
    ("self_num_checkpoints: 1.5", "`self_num_checkpoints` (config file {path}) expects a whole number, got 1.5",
     False),
    ("model_revision: [main, dev]", "`model_revision` (config file {path}) expects text, got a list", False),
    ("use_peft: 3", "`use_peft` (config file {path}) expects true or false, got 3", False),
    ("model:", "`model` (config file {path}) has no value", False),
    ("seed: 1", "config file {path}: `seed` is set twice (lines 11 and 29)", True),
]


@pytest.mark.parametrize("line,message,duplicate", YAML_BAD, ids=[c[0] for c in YAML_BAD])
def test_yaml_values_are_checked_against_the_settings_types(tmp_path, capsys, line, message, duplicate):
    path = _yaml(tmp_path, line, duplicate=duplicate)
    out = tmp_path / "run"
    code, err = cli(capsys, "run", "--config", path, "--output_dir", out, "--max_steps", "2")
    assert code == 2 and message.format(path=path) in err, err[-2000:]
    assert one_line(err)
    assert not out.exists()


def test_one_value_where_a_list_belongs_is_a_list_of_one(tmp_path):
    from peft import get_peft_model

    from sftmix.config import parse_config
    from sftmix.models import load_model_and_tokenizer
    from sftmix.run import publish

    cfg = parse_config(["--config", str(_yaml(tmp_path, "recipes: ntp", "use_peft: true",
                                              "lora_target_modules: q_proj", "self_ntp_epochs: 2.0")),
                        "--output_dir", str(tmp_path / "run")])
    assert cfg.run.recipes == ["ntp"]  # not the characters n, t, p
    assert cfg.run.self_ntp_epochs == 2 and isinstance(cfg.run.self_ntp_epochs, int)
    model, _ = load_model_and_tokenizer("tiny-random:0", dtype="fp32", device="cpu")
    peft_model = get_peft_model(model, publish.lora_config(cfg.run))  # a PEFT "not found" error on the old code
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj"}


# ---------------------------------------------------------------------------- models without a tokenizer, blank names


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
    """A tiny model folder with weights and config but no tokenizer files."""
    from sftmix.models import build_byte_tokenizer, build_tiny_model

    folder = tmp_path_factory.mktemp("models") / "no-tokenizer"
    build_tiny_model(build_byte_tokenizer(), seed=3).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("setting", ["model", "reference_model"])
def test_a_model_folder_without_a_tokenizer_is_refused_before_any_stage(tmp_path, capsys, no_tokenizer, setting):
    out = tmp_path / "run"
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, "--max_steps", "2",
                    f"--{setting}", no_tokenizer)
    assert code == 2 and f"{setting}={no_tokenizer}: the folder" in err and "has no tokenizer" in err, err[-2000:]
    assert one_line(err) and not (out / "data").exists()


@pytest.mark.parametrize("setting", ["model", "reference_model"])
@pytest.mark.parametrize("value", ["", "  "])
def test_a_blank_model_name_is_refused_not_the_default_model(tmp_path, capsys, setting, value):
    out = tmp_path / "run"
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, "--max_steps", "2", f"--{setting}", value)
    assert code == 2 and f"{setting} is empty (an unset shell variable?)" in err, err[-2000:]
    assert one_line(err) and not (out / "data").exists()


def test_a_hub_model_without_a_tokenizer_is_refused_before_any_stage(tmp_path, no_tokenizer):
    import os
    import subprocess
    import sys

    from hub_stub import HubStub

    with HubStub() as hub:
        hub.add_repo("org/no-tokenizer", no_tokenizer)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(hub.env(tmp_path / "hf_home"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        out = tmp_path / "run"
        res = subprocess.run([sys.executable, "-m", "sftmix.cli", "run", "--config", SMOKE, "--output_dir", str(out),
                              "--max_steps", "2", "--model", "org/no-tokenizer"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "model=org/no-tokenizer: the Hub repo at" in res.stderr, res.stderr[-2000:]
    assert "has no tokenizer" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "data").exists()


# ------------------------------------------------------------------------------------- run directories, sweeps


@pytest.mark.parametrize("command", ["report", "eval"])
def test_reading_commands_refuse_a_run_directory_that_does_not_exist(tmp_path, capsys, command):
    out = tmp_path / "typo"
    code, err = cli(capsys, command, "--output_dir", out)
    assert code == 2 and f"sftmix {command}: --output_dir {out} does not exist" in err, err[-2000:]
    assert one_line(err) and not out.exists()  # not created with the demo config
    out.mkdir()
    code, err = cli(capsys, command, "--output_dir", out)
    assert code == 2 and "holds no run (no config.yaml)" in err and one_line(err)
    assert list(out.iterdir()) == []


def test_run_without_an_output_dir_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "run", "--config", SMOKE, "--max_steps", "2")
    assert code == 2 and f"no run directory: give --output_dir DIR (or `output_dir:` in the config file {SMOKE})" \
        in err, err[-2000:]
    assert one_line(err) and list(tmp_path.iterdir()) == []  # no trainer_output/


def test_the_default_job_keeps_its_output_dir():
    from sftmix.config import parse_config

    assert parse_config([]).run_dir == Path("runs/demo")  # README's first command, bare `sftmix run`


def test_a_dangling_symlink_as_output_dir_is_one_line(tmp_path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", link, "--max_steps", "2")
    assert code == 2 and f"--output_dir {link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist" \
        in err, err[-2000:]
    assert one_line(err)


def test_a_sweep_checks_every_config_before_the_first_run(tmp_path, capsys):
    good = _yaml(tmp_path, "recipes: [ntp]", "max_steps: 2").rename(tmp_path / "a_good.yaml")
    bad = _yaml(tmp_path, "reference: self", "num_train_epochs: 1").rename(tmp_path / "b_bad.yaml")
    out = tmp_path / "sweep"
    code, err = cli(capsys, "sweep", good, bad, "--output_dir", out)
    assert code == 2 and f"sweep: {bad}: reference=self (one-run SFTMix) needs num_train_epochs greater" in err, \
        err[-2000:]
    assert not (out / "a_good").exists()  # the first config did not run


def test_a_sweep_run_that_fails_on_a_mistake_says_to_fix_it_not_to_rerun(tmp_path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    good = _yaml(tmp_path, "recipes: [ntp]", "max_steps: 2", "disable_tqdm: true").rename(tmp_path / "a_good.yaml")
    bad = _yaml(tmp_path, f"data: {data}", "recipes: [ntp]", "max_steps: 2").rename(tmp_path / "broken.yaml")
    code, err = cli(capsys, "sweep", good, bad, "--output_dir", tmp_path / "sweep")
    last = err.strip().splitlines()[-1]
    assert code == 1 and "broken: failed (exit 2)" in last, err[-2000:]
    assert "fix the error each of broken printed" in last and "to resume" not in last


# ------------------------------------------------------------------------------------------- text that is not text


@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_a_lone_surrogate_in_json_data_names_the_file_and_record(tmp_path, capsys, container):
    rows = ['{"instruction": "Say hi.", "output": "Hi."}', '{"instruction": "smile \\ud83d please", "output": "ok"}']
    data = tmp_path / f"data.{container}"
    data.write_text("\n".join(rows) + "\n" if container == "jsonl" else "[\n" + ",\n".join(rows) + "\n]\n")
    out = tmp_path / "run"
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, "--max_steps", "2", "--data", data)
    where = "line 2" if container == "jsonl" else "record 2 (line 3)"
    assert code == 2 and f"{data}: {where}: instruction (character 7: ...smile \\ud83d please...) has a lone " \
        "surrogate" in err, err[-2000:]
    assert one_line(err)
    from sftmix.data import load_records_with_stats

    records, stats = load_records_with_stats(str(data), on_bad="skip")  # skip: left out and counted, not dropped
    assert len(records) == 1 and stats["skipped"] == {"not_unicode": 1}


# ----------------------------------------------------------------------------------------------------------- smaller


def test_all_identical_data_gets_advice_that_can_help(tmp_path, capsys):
    data = tmp_path / "same.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "Hi there."}\n' * 48)
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", tmp_path / "run", "--max_steps", "2",
                    "--data", data)
    assert code == 2 and "all 48 examples are one example" in err and "give data with different examples" in err, \
        err[-2000:]
    assert "lower it" not in err and one_line(err)  # no held-out size helps


def test_the_reports_train_loss_and_time_cover_a_resumed_run_whole(tmp_path, capsys):
    import json
    import shutil

    out = tmp_path / "run"
    args = ["--config", SMOKE, "--output_dir", out, "--recipes", "ntp", "--max_steps", "6", "--save_steps", "3",
            "--save_total_limit", "3", "--keep_checkpoints", "true", "--logging_steps", "1", "--disable_tqdm", "true"]
    code, err = cli(capsys, "run", *args)
    assert code == 0, err[-2000:]
    whole = json.loads((out / "report.json").read_text())["models"]["ntp"]["train"]
    ntp = out / "ntp"
    # as a run killed after checkpoint-3 leaves it: no final model, no newer checkpoint; the rerun resumes at step 3
    shutil.rmtree(ntp / "model")
    shutil.rmtree(ntp / "checkpoint-6")
    (ntp / "train_result.json").unlink()
    code, err = cli(capsys, "run", *args)
    assert code == 0, err[-2000:]
    code, err = cli(capsys, "report", "--output_dir", out)
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    resumed = report["models"]["ntp"]["train"]
    assert resumed["resumed_from"] == str(ntp / "checkpoint-3")
    # the same six steps (a resumed run is exact): the same mean loss, not the resumed half's sum over six steps
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-3)
    part = json.loads((ntp / "train_result.json").read_text())["metrics"]["resumed_part"]
    assert abs(part["train_loss"] - whole["train_loss"]) > 0.01  # the resumed steps' mean: what the report showed
    # the time includes the first three steps' (saved with checkpoint-3), not only the resumed part's
    assert resumed["train_runtime"] > part["train_runtime"]
    row = next(r for r in report["comparison"] if r["model"] == "ntp")
    assert row["train_seconds"] == resumed["train_runtime"]
