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


@pytest.mark.parametrize("args,message", ONE_RUN_BAD, ids=[m for _, m in ONE_RUN_BAD])
def test_one_run_settings_are_refused_before_any_recipe_trains(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, *ONE_RUN, *args)
    assert code == 2 and message in err, err[-2000:]
    assert one_line(err)
    assert "self_reference_epochs" not in err  # the trainer's name, not the user's
    assert "reference=self (one-run SFTMix)" in err or "self_num_checkpoints" in err
    assert not (out / "ntp").exists() and not (out / "sftmix").exists()  # nothing trained
