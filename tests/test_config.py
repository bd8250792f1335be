"""sftmix.config: each setting's stage is declared once, and the questions asked of it are answered from there."""

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from sftmix import config
from sftmix.config import (
    EVAL_TASK_FIELDS,
    SETTING_STAGES,
    EvalConfig,
    RunConfig,
    eval_task_fields,
    parse_config,
    settings_of,
    stage_of,
    unaffected_settings,
)
from sftmix.mixup.args import MixupArguments
from sftmix.utils import SFTMixError

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def test_every_setting_of_ours_has_exactly_one_stage():
    named = Counter(n for names in SETTING_STAGES.values() for n in names)
    assert [n for n, c in named.items() if c > 1] == []
    ours = [f.name for cls in (RunConfig, MixupArguments) for f in dataclasses.fields(cls)]
    assert [n for n in ours if n not in named] == []  # a new field must be given its stage in SETTING_STAGES
    from sftmix.mixup.trainer import SFTMixConfig

    known = {f.name for f in dataclasses.fields(SFTMixConfig)} | set(ours)
    assert [n for n in named if n not in known] == []  # no stale name (a renamed or removed field)
    eval_names = {f.name for f in dataclasses.fields(EvalConfig)}
    assert [n for names in EVAL_TASK_FIELDS.values() for n in names if n not in eval_names] == []


def test_stage_questions():
    assert stage_of("mixup_weight") == "mixup" and stage_of("num_threads") == "runtime"
    assert stage_of("learning_rate") == "train"  # an SFTConfig field named nowhere: read by every training run
    assert stage_of("eval_max_length") == "eval" and stage_of("pubmedqa_file") == "eval"
    assert settings_of("selection") == ["selection", "selection_k", "selection_score_column", "selection_threshold"]
    assert "eval_seed" in settings_of("eval") and "seed" not in settings_of("eval")
    with pytest.raises(SFTMixError, match="unknown stage"):
        settings_of("training")
    run = unaffected_settings("run")
    assert {"num_threads", "pubmedqa_file", "judge_min_valid_fraction"} <= run and "learning_rate" not in run
    assert "mixup_weight" not in run and "lora_r" not in run
    step1 = unaffected_settings("dynamics")
    assert {"mixup_weight", "lora_r", "num_train_epochs", "selection_k"} <= step1
    assert not {"learning_rate", "data", "num_checkpoints", "seed"} & step1
    selected = parse_config(["--config", SMOKE, "--output_dir", "x", "--selection", "long", "--selection_k", "8"])
    assert "selection_k" not in unaffected_settings("dynamics", selected)  # step 1 runs on the selected examples
    assert eval_task_fields("medqa")[-2:] == ["medqa_file", "medqa_shots_file"]
    assert eval_task_fields("mtbench")[-1] == "mtbench_file"


def test_flat_config_writes_the_mixup_and_selection_settings_in_table_order():
    cfg = parse_config(["--config", SMOKE, "--output_dir", "x"])
    keys = list(cfg.flat())
    mix = [k for k in keys if k in settings_of("mixup", "selection")]
    assert mix == settings_of("mixup", "selection")
    assert config.stage_of("output_dir") == "target"
