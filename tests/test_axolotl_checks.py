"""The axolotl plugin's config checks (sftmix.integrations.axolotl_checks), in sftmix's own environment: they import
no axolotl, and the plugin's pydantic validator runs the same function when axolotl validates the YAML
(tests/integrations/test_axolotl.py::test_bad_yaml_values_are_refused runs it there)."""

import math
from pathlib import Path

import pytest

from sftmix.integrations.axolotl_checks import check_plugin_config, mixup_arguments
from sftmix.mixup.args import MixupArguments
from sftmix.utils import SFTMixError

GOOD = {"sftmix_confidence_file": "runs/ref/confidence.jsonl", "sftmix_mixup_alpha": 0.5, "sftmix_mixup_weight": 0.2,
        "sample_packing": False, "micro_batch_size": 8}


@pytest.mark.parametrize("bad, match", [
    ({"sftmix_mixup_alpha": math.nan}, r"sftmix_mixup_alpha must be a finite number > 0.*got nan"),
    ({"sftmix_mixup_alpha": math.inf}, r"sftmix_mixup_alpha must be a finite number > 0.*got inf"),
    ({"sftmix_mixup_alpha": 0.0}, r"sftmix_mixup_alpha must be a finite number > 0"),
    ({"sftmix_mixup_weight": math.nan}, r"sftmix_mixup_weight must be a finite number >= 0.*got nan"),
    ({"sftmix_mixup_weight": -math.inf}, r"sftmix_mixup_weight must be a finite number >= 0"),
    ({"sftmix_mixup_chunk_tokens": 0}, r"sftmix_mixup_chunk_tokens must be a whole number >= 1.*got 0"),
    ({"sftmix_mixup_chunk_tokens": -4}, r"sftmix_mixup_chunk_tokens must be a whole number >= 1"),
    ({"sftmix_mixup_role": "sometimes"}, r"sftmix_mixup_role='sometimes' is not one of"),
    ({"sample_packing": True}, r"sample_packing is not supported by SFTMix.*sample_packing: false"),
    ({"rl": "dpo"}, r"supervised fine-tuning \(SFT\) only"),
    ({"micro_batch_size": 3}, r"micro_batch_size: 3 is odd.*e\.g\. 4"),
    ({"sftmix_confidence_file": None}, r"sftmix_confidence_file is required"),
])
def test_plugin_config_refuses_what_the_core_refuses_in_one_line_with_the_yaml_key(bad, match):
    with pytest.raises(SFTMixError, match=match) as e:
        check_plugin_config({**GOOD, **bad})
    assert "\n" not in str(e.value)


def test_plugin_config_accepts_the_paper_settings_and_mixup_off():
    check_plugin_config(GOOD)
    check_plugin_config({"sftmix_mixup_weight": 0.0, "micro_batch_size": 3})  # plain NTP: no file, any batch
    args = mixup_arguments({"sftmix_mixup_weight": 0.3, "sftmix_mixup_chunk_tokens": None})
    assert (args.mixup_weight, args.mixup_alpha, args.mixup_chunk_tokens) == (0.3, 0.5, None)  # defaults filled in


def test_mixup_arguments_refuse_non_finite_values_and_a_zero_chunk():
    """The core's own check (every trainer's arguments): NaN passed `mixup_alpha <= 0` before."""
    for kw in ({"mixup_alpha": math.nan}, {"mixup_alpha": math.inf}, {"mixup_weight": math.nan},
               {"mixup_weight": math.inf}, {"mixup_chunk_tokens": 0}):
        with pytest.raises(SFTMixError, match=f"^{next(iter(kw))} must be"):
            MixupArguments(**kw).validate_mixup_args()
    MixupArguments(mixup_chunk_tokens=4096).validate_mixup_args()


# -- step 1 of the axolotl route: examples/axolotl/step1.yaml ---------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "axolotl"


def documented_step1_command() -> list[str]:
    """The step-1 command as examples/axolotl/sftmix.yaml's header gives it (`1. sftmix dynamics ...`)."""
    line = next(x for x in (EXAMPLES / "sftmix.yaml").read_text().splitlines() if x.lstrip("# ").startswith("1. "))
    words = line.lstrip("# ").split()[1:]
    assert words[:2] == ["sftmix", "dynamics"], line
    return words[2:]


def test_step1_config_agrees_with_the_axolotl_yaml(tmp_path):
    """The shipped step-1 config holds nothing out, filters nothing, and trains the reference on sftmix.yaml's model,
    data, sequence length, seed and optimiser settings."""
    import yaml

    from sftmix.config import parse_config

    axo = yaml.safe_load((EXAMPLES / "sftmix.yaml").read_text())
    argv = documented_step1_command()
    assert argv[:2] == ["--config", "examples/axolotl/step1.yaml"]
    cfg = parse_config([argv[0], str(EXAMPLES / "step1.yaml"), "--output_dir", str(tmp_path)])
    run, tr = cfg.run, cfg.train
    assert (run.heldout, run.max_prompt_chars, run.max_turn, run.data_limit) == (0, None, None, None)
    assert run.model == axo["base_model"] and run.data.endswith(axo["datasets"][0]["path"])
    assert tr.max_length == axo["sequence_len"] and tr.seed == axo["seed"]
    assert (tr.per_device_train_batch_size, tr.gradient_accumulation_steps) == (axo["micro_batch_size"],
                                                                                axo["gradient_accumulation_steps"])
    assert (tr.learning_rate, tr.weight_decay, tr.warmup_steps) == (axo["learning_rate"], axo["weight_decay"],
                                                                    axo["warmup_ratio"])
    assert tr.lr_scheduler_type == axo["lr_scheduler"] and axo.get("sftmix_unmatched_rows", "error") == "error"


def test_documented_step1_command_scores_every_row_untruncated(tmp_path):
    """The documented step-1 command, with a tiny model and a small Alpaca file in place of Llama and data/alpaca.json:
    confidence.jsonl has every row, the long ones untruncated (the demo's settings held 32 out, dropped prompts over
    600 characters and cut every example to 192 tokens)."""
    import json
    import random

    from sftmix.cli import run_command
    from sftmix.data import load_records
    from sftmix.utils import read_jsonl

    rng = random.Random(0)
    words = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird"]
    rows = [{"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))),
             "output": " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))} for _ in range(40)]
    rows[3]["instruction"] = "long " + " ".join(rng.choice(words) for _ in range(160))  # > 600 characters
    rows[7]["output"] = "long " + " ".join(rng.choice(words) for _ in range(80))  # > 192 tokens (bytes)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "ref"
    argv = [a.replace("examples/axolotl/", str(EXAMPLES) + "/") for a in documented_step1_command()]
    # the model, data, run directory and batch of a CPU test; every data-shaping setting is the documented one
    argv = [a for a in argv if a not in ("--output_dir", "runs/ref")]
    assert run_command(["dynamics", *argv, "--model", "tiny-random:0", "--data", str(data), "--output_dir", str(out),
                        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                        "--num_checkpoints", "2", "--gradient_checkpointing", "false", "--num_threads", "1"]) == 0
    conf = read_jsonl(out / "confidence.jsonl")
    assert sorted(r["guid"] for r in conf) == sorted(r["guid"] for r in load_records(data))  # every row
    long = {r["guid"]: r for r in conf}[load_records(data)[7]["guid"]]
    assert long["n_tokens"] > len(rows[7]["output"]) > 192  # the whole response (a byte tokenizer; + end token)
    assert read_jsonl(out / "data" / "heldout.jsonl") == []


def test_heldout_zero_needs_a_heldout_file_to_evaluate(tmp_path):
    from sftmix.config import parse_config
    from sftmix.run.validation import validate

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    cfg = parse_config(["--config", smoke, "--output_dir", str(tmp_path / "run"), "--heldout", "0"])
    assert cfg.run.n_heldout == 0
    (tmp_path / "run").mkdir()  # `sftmix eval` reads an existing run dir (run.validation.check_existing_run)
    (tmp_path / "run" / "config.yaml").write_text("")
    for command in ("run", "eval"):
        with pytest.raises(SFTMixError, match="heldout: 0 holds no examples out.*set heldout_file"):
            validate(cfg, command)
    validate(cfg, "dynamics")
    with pytest.raises(SFTMixError, match=r"heldout=-1.0: give a whole count"):
        parse_config(["--config", smoke, "--output_dir", str(tmp_path / "run"), "--heldout", "-1"])
