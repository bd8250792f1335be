"""The axolotl plugin in axolotl's own environment (axolotl 0.19, TRL 1.9, transformers 5.16; `.ci/axolotl-tests`).

What runs, on CPU with a tiny random Llama saved to disk: axolotl's own config loading (load_cfg: plugin registration,
the merge of the plugin's pydantic args, validation and normalisation) of a YAML that enables the plugin; axolotl's
dataset pipeline through the plugin's load_datasets (Alpaca rows tokenized by axolotl, guids joined to a confidence
file); axolotl's own model and trainer setup (setup_model_and_trainer: the builder asks the plugin for the trainer
class and training arguments); training steps that log ntp_loss and mixup_loss; and the Mixup loss of the axolotl
trainer against an independent computation and against sftmix.mixup.hf's SFTMixHFTrainer on the same batch and
weights. Skipped where axolotl is not installed (the main environment)."""

import json
import math
import random
import sys
from pathlib import Path

import pytest

axolotl = pytest.importorskip("axolotl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from sftmix.confidence.split import split_confident  # noqa: E402
from sftmix.data import load_records  # noqa: E402
from sftmix.models import build_byte_tokenizer, build_tiny_model  # noqa: E402
from sftmix.utils import SFTMixError, write_jsonl  # noqa: E402

pytestmark = pytest.mark.axolotl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
from helpers import capture_pairs, naive_mixup_loss  # noqa: E402

WORDS = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "red", "blue", "green", "small"]


def alpaca_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))),
               "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))}
        if i % 3 == 0:
            row["input"] = f"item {i}"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, 24 Alpaca rows, step 1's confidence file for them (guids as sftmix computes them; the
    confidence values are random: step 1 itself is tested in sftmix's own environment), and the YAML."""
    root = tmp_path_factory.mktemp("axolotl")
    tok = build_byte_tokenizer()
    build_tiny_model(tok, seed=0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data.json"
    data.write_text(json.dumps(alpaca_rows(24)))
    guids = [r["guid"] for r in load_records(data)]
    conf = np.random.default_rng(0).random(len(guids))
    flags = split_confident(conf, guids)
    write_jsonl(root / "confidence.jsonl", [{"guid": g, "confidence": float(c), "confident": bool(f)}
                                            for g, c, f in zip(guids, conf, flags)])
    cfg = {
        "base_model": str(root / "model"),
        "plugins": ["sftmix.integrations.axolotl.SFTMixPlugin"],
        "sftmix_confidence_file": str(root / "confidence.jsonl"),
        "sftmix_mixup_alpha": 0.5,
        "sftmix_mixup_weight": 0.2,
        "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(root / "prepared"),
        "val_set_size": 0,
        "sequence_len": 512,
        "sample_packing": False,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "output_dir": str(root / "out"),
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": 0,
        "dataloader_num_workers": 0,
        "use_tensorboard": False,
    }
    path = root / "sftmix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"root": root, "yaml": path, "cfg": cfg, "guids": guids, "flags": flags, "tok": tok}


@pytest.fixture(scope="module")
def cfg(setup):
    from axolotl.cli.config import load_cfg

    return load_cfg(str(setup["yaml"]))


def test_plugin_loads_from_yaml(cfg):
    from axolotl.integrations.base import PluginManager

    from sftmix.integrations.axolotl import SFTMixPlugin

    plugins = PluginManager.get_instance().plugins
    assert any(isinstance(p, SFTMixPlugin) for p in plugins.values())
    # the flat keys went through the plugin's pydantic args (validated, defaults filled in)
    assert cfg.sftmix_mixup_weight == 0.2 and cfg.sftmix_mixup_alpha == 0.5
    assert cfg.sftmix_mixup_role == "regularizer" and cfg.sftmix_ntp_subset == "all"


def test_bad_yaml_values_are_refused(setup):
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    for bad, match in (({"sftmix_mixup_role": "sometimes"}, "sftmix_mixup_role"),
                       ({"sftmix_confidence_file": None}, "sftmix_confidence_file is required"),
                       # the core's checks, with the YAML's names, when axolotl validates the config (before any
                       # dataset is read or tokenized): sftmix.integrations.axolotl_checks
                       ({"sftmix_mixup_alpha": float("nan")}, "sftmix_mixup_alpha must be a finite number > 0"),
                       ({"sftmix_mixup_weight": float("inf")}, "sftmix_mixup_weight must be a finite number >= 0"),
                       ({"sftmix_mixup_chunk_tokens": 0}, "sftmix_mixup_chunk_tokens must be a whole number >= 1"),
                       ({"sample_packing": True}, "sample_packing is not supported by SFTMix"),
                       ({"micro_batch_size": 3}, "micro_batch_size: 3 is odd")):
        with pytest.raises(Exception, match=match):
            validate_config(DictDefault({**setup["cfg"], **bad}))


def test_packing_is_refused_before_preprocessing(setup, tmp_path):
    """`axolotl preprocess` with sample_packing: true stops at config validation, before any dataset is tokenized
    (before, the plugin refused packing only in get_trainer_cls, after preprocessing)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    prepared = tmp_path / "prepared"
    cfg = {**setup["cfg"], "sample_packing": True, "dataset_prepared_path": str(prepared),
           "output_dir": str(tmp_path / "out")}
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",
           "WANDB_MODE": "disabled"}
    proc = subprocess.run([str(Path(sys.executable).parent / "axolotl"), "preprocess", str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "sample_packing is not supported by SFTMix" in proc.stdout + proc.stderr
    assert not prepared.exists() or not any(prepared.rglob("*.arrow"))  # nothing was tokenized


def test_datasets_get_guid_and_half_by_content(setup, cfg):
    from axolotl.integrations.base import PluginManager

    meta = PluginManager.get_instance().load_datasets(cfg, preprocess=False)
    ds = meta.train_dataset
    assert {"input_ids", "labels", "guid", "confident", "confidence"} <= set(ds.column_names)
    want = dict(zip(setup["guids"], setup["flags"].tolist()))
    assert sorted(ds["guid"]) == sorted(setup["guids"])  # every row matched, none dropped
    assert [want[g] for g in ds["guid"]] == ds["confident"]
    # the row with guid g is the example sftmix hashed to g: its trained tokens are that example's response
    records = {r["guid"]: r for r in load_records(setup["root"] / "data.json")}
    for row in ds.select(range(5)):
        trained = setup["tok"].decode([t for t in row["labels"] if t != -100])
        assert records[row["guid"]]["completion"][0]["content"] in trained


def test_unmatched_rows_are_one_line_errors(setup, cfg):
    from sftmix.integrations.axolotl import join_confidence_file, load_datasets_with_guids

    ds = load_datasets_with_guids(cfg).train_dataset
    short = setup["root"] / "short.jsonl"
    rows = [json.loads(line) for line in (setup["root"] / "confidence.jsonl").read_text().splitlines()]
    write_jsonl(short, rows[:-2])
    with pytest.raises(SFTMixError, match="only 22 of 24 examples have a confidence row") as e:
        join_confidence_file(ds, str(short))
    assert "\n" not in str(e.value) and str(short) in str(e.value) and "sftmix_unmatched_rows: drop" in str(e.value)
    assert len(join_confidence_file(ds, str(short), "drop")) == 22
    with pytest.raises(SFTMixError, match="does not exist"):
        join_confidence_file(ds, str(setup["root"] / "missing.jsonl"))


def test_a_missing_confidence_file_is_found_before_the_data_is_tokenized(cfg, tmp_path):
    from axolotl.utils.dict import DictDefault

    from sftmix.integrations.axolotl import SFTMixPlugin

    prepared = tmp_path / "prepared"
    missing = DictDefault({**cfg, "sftmix_confidence_file": str(tmp_path / "nope.jsonl"),
                           "dataset_prepared_path": str(prepared)})
    with pytest.raises(SFTMixError, match=r"nope.jsonl does not exist.*step1.yaml") as e:
        SFTMixPlugin().load_datasets(missing)
    assert "\n" not in str(e.value)
    assert not prepared.exists() or not any(prepared.rglob("*.arrow"))  # before, it tokenized first, then failed


def test_trainer_builds_and_trains_logging_ntp_and_mixup(setup, cfg):
    from axolotl.integrations.base import PluginManager
    from axolotl.train import setup_model_and_trainer

    from sftmix.integrations.axolotl_trainer import SFTMixAxolotlTrainer
    from sftmix.mixup.sampling import BalancedPairSampler

    meta = PluginManager.get_instance().load_datasets(cfg, preprocess=False)
    trainer, model, *_ = setup_model_and_trainer(cfg, meta)
    assert isinstance(trainer, SFTMixAxolotlTrainer)
    assert trainer.args.mixup_weight == 0.2 and trainer.args.mixup_alpha == 0.5
    assert isinstance(trainer._get_train_sampler(), BalancedPairSampler)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["confident"].sum().item() == 2 and (~batch["confident"]).sum().item() == 2

    trainer.train()
    logs = [h for h in trainer.state.log_history if "mixup_loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert math.isfinite(h["ntp_loss"]) and math.isfinite(h["mixup_loss"])
        assert h["loss"] == pytest.approx(h["ntp_loss"] + 0.2 * h["mixup_loss"], rel=1e-4)


def test_axolotl_mixup_equals_the_core_on_the_same_batch(setup, cfg, tmp_path):
    """The axolotl trainer's Mixup loss on one batch equals naive_mixup_loss on a separate forward (1e-5 relative) and
    SFTMixHFTrainer's (transformers.Trainer + sftmix.mixup.mixin) on the same batch and weights (1e-6 relative)."""
    from axolotl.integrations.base import PluginManager
    from axolotl.train import setup_model_and_trainer

    from sftmix.mixup.hf import SFTMixHFTrainer, SFTMixTrainingArguments

    meta = PluginManager.get_instance().load_datasets(cfg, preprocess=False)
    trainer, model, *_ = setup_model_and_trainer(cfg, meta)
    seen = capture_pairs(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, {k: v.clone() for k, v in batch.items()})
    pairs, lam = seen[-1]
    axo_mix = trainer._metrics["train"]["mixup_loss"][-1]
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref = naive_mixup_loss(hidden, batch["labels"], model.lm_head.weight, pairs, lam).item()
    assert axo_mix == pytest.approx(ref, rel=1e-5)

    core = SFTMixHFTrainer(model=build_tiny_model(setup["tok"], seed=0), processing_class=setup["tok"],
                           args=SFTMixTrainingArguments(output_dir=str(tmp_path), report_to=[], seed=0,
                                                        per_device_train_batch_size=4, use_cpu=True),
                           train_dataset=meta.train_dataset)
    core.model.load_state_dict(model.state_dict())
    core_seen = capture_pairs(core)
    core.model.train()
    core.compute_loss(core.model, {k: v.clone() for k, v in batch.items()})
    assert torch.equal(core_seen[-1][0], pairs) and torch.equal(core_seen[-1][1], lam)
    assert core._metrics["train"]["mixup_loss"][-1] == pytest.approx(axo_mix, rel=1e-6)


def test_axolotl_train_command_end_to_end(setup, tmp_path):
    """`axolotl train sftmix.yaml` (the CLI, one process on CPU): trains with the plugin, logs both losses, saves."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = {**setup["cfg"], "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prepared"),
           "max_steps": 2}
    path = tmp_path / "sftmix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",
           "WANDB_MODE": "disabled"}
    cli = Path(sys.executable).parent / "axolotl"
    proc = subprocess.run([str(cli), "train", str(path), "--launcher", "python"], env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("'mixup_loss'") >= 2 and "'ntp_loss'" in out, out[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists() or any((tmp_path / "out").glob("*.safetensors"))


def test_example_yaml_validates(cfg):
    """examples/axolotl/sftmix.yaml passes axolotl's schema with the plugin's args (its model is not loaded)."""
    from pathlib import Path

    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    text = (Path(__file__).parents[2] / "examples" / "axolotl" / "sftmix.yaml").read_text()
    # step 1 with the config shipped beside it (every row scored: tests/test_axolotl_checks.py), so no row may lack
    # a confidence here (sftmix_unmatched_rows left at `error`)
    assert text.splitlines()[1].lstrip("# ").startswith("1. sftmix dynamics --config examples/axolotl/step1.yaml")
    assert text.splitlines()[4].lstrip("# ").startswith("2. axolotl train examples/axolotl/sftmix.yaml")
    example = validate_config(DictDefault(yaml.safe_load(text)))
    assert example.sftmix_mixup_weight == 0.2 and example.sftmix_unmatched_rows == "error"
    assert example.plugins == ["sftmix.integrations.axolotl.SFTMixPlugin"]
