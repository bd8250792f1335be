"""The paper's analyses as trainer options (§5): split source, data selection, pairing, Mixup weight schedules."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_dataset
from test_trainer import COMMON, make_trainer

from sftmix import SFTMixConfig
from sftmix.confidence.split import nearest_partners, select_examples
from sftmix.mixup.args import mixup_weight_at
from sftmix.models import build_byte_tokenizer
from sftmix.utils import SFTMixError, read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def args(tmp_path, **kw):
    return SFTMixConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **{**COMMON, **kw})


def test_split_source_column_with_labels(tok, tmp_path):
    ds = tiny_dataset(16, with_confidence=False)
    quality = ["High" if i % 4 else "Low" for i in range(16)]
    ds = ds.add_column("quality", quality)
    tr = make_trainer(tok, tmp_path, ds, per_device_train_batch_size=4, max_steps=1, split_source="column",
                      split_column="quality", split_confident_values=["High"])
    assert tr.train_dataset["confident"] == [q == "High" for q in quality]
    with pytest.raises(SFTMixError, match="split_confident_values"):
        make_trainer(tok, tmp_path, ds, per_device_train_batch_size=4, split_source="column", split_column="quality")
    with pytest.raises(SFTMixError, match="not a column"):
        make_trainer(tok, tmp_path, ds, per_device_train_batch_size=4, split_source="column", split_column="nope")


def test_split_source_column_overrides_confidence(tok, tmp_path):
    ds = tiny_dataset(16)  # has a `confidence` column, which split_source=column must ignore
    ds = ds.add_column("score", [float(i) for i in range(16)])
    tr = make_trainer(tok, tmp_path, ds, per_device_train_batch_size=4, max_steps=1, split_source="column",
                      split_column="score")
    assert tr.train_dataset["confident"] == [i >= 8 for i in range(16)]


def test_selection_long_random_score(tmp_path):
    ds = tiny_dataset(20).add_column("score", [i % 5 for i in range(20)])
    lengths = [len(c[0]["content"]) for c in ds["completion"]]
    kept, desc = select_examples(ds, args(tmp_path, selection="long", selection_k=6))
    assert len(kept) == 6 and "longest" in desc
    assert min(len(c[0]["content"]) for c in kept["completion"]) >= sorted(lengths)[-6]
    kept, _ = select_examples(ds, args(tmp_path, selection="score", selection_threshold=3))
    assert kept["score"] == [s for s in ds["score"] if s >= 3]
    a, _ = select_examples(ds, args(tmp_path, selection="random", selection_k=8))
    b, _ = select_examples(ds, args(tmp_path, selection="random", selection_k=8))
    assert len(a) == 8 and a["guid"] == b["guid"]
    with pytest.raises(SFTMixError, match="selection_k"):
        args(tmp_path, selection="long")


def test_selection_applies_before_split_in_trainer(tok, tmp_path):
    tr = make_trainer(tok, tmp_path, tiny_dataset(32), per_device_train_batch_size=4, max_steps=1, selection="random",
                      selection_k=12)
    assert len(tr.train_dataset) == 12 and sum(tr.train_dataset["confident"]) == 6
    assert "12 of 32" in tr.selection_description


def test_nearest_pairing_pairs_neighbours_and_covers_everyone():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16)) * 10
    emb = np.concatenate([centers + rng.normal(size=(6, 16)) * 0.1, centers + rng.normal(size=(6, 16)) * 0.1])
    confident = np.array([True] * 6 + [False] * 6)
    c, u = nearest_partners(emb, confident)
    assert set(c) == set(range(6)) and set(u) == set(range(6, 12))
    assert all(uu - cc == 6 for cc, uu in zip(c, u))  # each example's twin across the halves


def test_nearest_pairing_in_trainer(tok, tmp_path):
    ds = tiny_dataset(16)
    emb = np.random.default_rng(1).normal(size=(16, 8)).tolist()
    tr = make_trainer(tok, tmp_path, ds.add_column("pairing_embedding", emb), per_device_train_batch_size=4,
                      max_steps=2, pairing="nearest")
    tr.train()
    c, u = tr.pair_sampler.epoch_pairs(0)
    flags = np.array(tr.train_dataset["confident"])
    assert flags[c].all() and not flags[u].any()
    with pytest.raises(SFTMixError, match="pairing_embedding"):
        make_trainer(tok, tmp_path, ds, per_device_train_batch_size=4, pairing="nearest").get_train_dataloader()


@pytest.mark.parametrize("schedule,start,mid,end", [("constant", 0.2, 0.2, 0.2), ("linear_warmup", 0.0, 0.1, 0.2),
                                                    ("linear_decay", 0.2, 0.1, 0.0), ("cosine", 0.2, 0.1, 0.0)])
def test_mixup_weight_schedules(tmp_path, schedule, start, mid, end):
    a = args(tmp_path, mixup_weight_schedule=schedule)
    got = [mixup_weight_at(a, s, 10) for s in (0, 5, 10)]
    np.testing.assert_allclose(got, [start, mid, end], atol=1e-12)


def test_schedule_reaches_the_logs(tok, tmp_path):
    tr = make_trainer(tok, tmp_path, per_device_train_batch_size=4, max_steps=4, mixup_weight_schedule="linear_warmup")
    tr.train()
    mus = [h["mixup_weight"] for h in tr.state.log_history if "mixup_weight" in h]
    assert mus == pytest.approx([0.0, 0.05, 0.1, 0.15])


# ----------------------------------------------------------------------------------------------------------------
# The paper's §5 analyses as the paper runs them: selection re-splits its subset (§5.5), one-half NTP without Mixup
# trains on that half alone (§5.4), the weaker reference is Gemma-2-2B (§5.1).

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _fake_reference(seen):
    """Step 1 whose confidence rises with response length (confidence = response tokens): records the examples the
    reference was given and writes confidence.jsonl as run_reference does."""
    from sftmix.confidence.split import split_confident

    def run_reference(model, tok, ds, out_dir, **kw):
        guids, conf = list(ds["guid"]), [float(n) for n in ds["n_response_tokens"]]
        seen.append(guids)
        flags = split_confident(conf, guids)
        rows = [{"guid": g, "confidence": c, "variability": 0.0, "confident": bool(f)}  # what the stage's plots read
                for g, c, f in zip(guids, conf, flags)]
        write_jsonl(Path(out_dir) / "confidence.jsonl", rows)
        return rows

    return run_reference


def _capture_trainers(monkeypatch):
    from sftmix.mixup.trainer import SFTMixTrainer

    trainers, train = [], SFTMixTrainer.train

    def capture(self, *a, **kw):
        trainers.append(self)
        return train(self, *a, **kw)

    monkeypatch.setattr(SFTMixTrainer, "train", capture)
    return trainers


def _run_argv(out, *extra):
    return ["--config", SMOKE, "--output_dir", str(out), "--num_train_epochs", "1", "--disable_tqdm", "true",
            "--save_strategy", "no", *extra]


def test_selection_long_runs_step1_on_the_subset_equal_halves_no_repeats(tmp_path, monkeypatch):
    import torch

    from sftmix import recipe
    from sftmix.config import parse_config
    from sftmix.data import ensure_chat_template, tokenize_records
    from sftmix.run import context, stages

    seen = []
    monkeypatch.setattr(stages, "run_reference", _fake_reference(seen))
    trainers = _capture_trainers(monkeypatch)
    out = tmp_path / "subset"
    cfg = parse_config(_run_argv(out, "--selection", "long", "--selection_k", "12", "--recipes", "sftmix"))
    assert cfg.run.selection_split == "subset"  # the paper's way is the default
    assert recipe.run(cfg, "dynamics") == 0
    # the reference saw the 12 examples with the longest responses (target tokens), nothing else
    tok = build_byte_tokenizer()
    ensure_chat_template(tok, "auto")
    full, _ = tokenize_records(context.train_records(cfg), tok, max_length=cfg.train.max_length)
    length = dict(zip(full["guid"], full["n_response_tokens"]))
    (step1,) = seen
    assert len(step1) == 12 and len(full) == 40
    assert min(length[g] for g in step1) >= max(length[g] for g in length if g not in step1)
    split = json.loads((out / "dynamics" / "split.json").read_text())
    assert (split["n_examples"], split["n_confident"], split["n_unconfident"]) == (12, 6, 6)
    assert "12 of 40" in split["selection"]
    try:
        assert recipe.run(cfg, "train") == 0
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    (tr,) = trainers
    assert sorted(tr.train_dataset["guid"]) == sorted(step1)
    flags = np.asarray(tr.train_dataset["confident"])
    assert flags.sum() == (~flags).sum() == 6  # equal halves of the selected data
    epoch = list(tr.pair_sampler)
    assert len(epoch) == 12 and len(set(epoch)) == 12  # every selected row exactly once: no row repeats
    result = json.loads((out / "sftmix" / "train_result.json").read_text())
    assert result["duplicates_per_epoch"] == 0 and result["global_step"] == 3  # 12 rows / batch 4
    assert result["n_train_examples"] == 12 and "12 of 40" in result["selection"]


def test_selection_split_all_keeps_full_data_flags_and_refuses_a_one_sided_subset(tmp_path, monkeypatch, capsys):
    from sftmix import recipe
    from sftmix.cli import main
    from sftmix.config import parse_config
    from sftmix.run import context, examples, stages

    seen = []
    monkeypatch.setattr(stages, "run_reference", _fake_reference(seen))
    trainers = _capture_trainers(monkeypatch)
    out = tmp_path / "all"
    argv = _run_argv(out, "--selection", "long", "--selection_k", "12", "--selection_split", "all", "--recipes",
                     "ntp", "sftmix")
    # step 1 on all 40 examples: confidence rises with length, so the 12 longest are all on the confident side
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (progress bars above it)
    assert err.startswith("sftmix: error: selection=long (the 12 of 40 examples with the longest responses) leaves "
                          "12 confident and 0 unconfident examples by step 1's split of all the data")
    assert "selection_split=subset" in err
    assert [len(s) for s in seen] == [40] and not trainers  # refused before any training (NTP came first)
    assert not (out / "ntp").exists() and not (out / "sftmix").exists()
    # the variant itself works where both halves keep 2 examples: the full-data flags are kept, halves unequal
    cfg = parse_config(_run_argv(tmp_path / "all2", "--selection", "random", "--selection_k", "12",
                                 "--selection_split", "all", "--recipes", "sftmix", "--max_steps", "1"))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stages, "run_reference", _fake_reference(seen))
        recipe.run(cfg, "dynamics")
        examples.check_split_halves(cfg)
        ds, _ = examples.selected_target_dataset(cfg, context.train_records(cfg))
    full = {r["guid"]: r["confident"] for r in read_jsonl(tmp_path / "all2" / "confidence.jsonl")}
    assert len(full) == 40 and len(seen[-1]) == 40 and len(ds) == 12
    joined = examples.with_split(cfg, ds)  # what stage_train trains on: the selected rows, full-data flags
    assert joined["confident"] == [full[g] for g in ds["guid"]]


def test_selection_leaving_fewer_than_two_in_a_column_half_is_refused_before_training(tmp_path, monkeypatch):
    from sftmix import recipe
    from sftmix.config import parse_config

    trainers = _capture_trainers(monkeypatch)
    data = [json.loads(x) for x in (ROOT / "configs" / "data" / "smoke_labeled.jsonl").read_text().splitlines()]
    for i, r in enumerate(data):  # the 12 best-scored examples are all High but one
        r["score"], r["quality"] = float(i), "Low" if i in (3, 47) else "High"
    write_jsonl(tmp_path / "d.jsonl", data)
    cfg = parse_config(_run_argv(tmp_path / "run", "--data", str(tmp_path / "d.jsonl"), "--selection", "score",
                                 "--selection_threshold", "20", "--split_source", "column", "--split_column",
                                 "quality", "--split_confident_values", "High"))
    with pytest.raises(SFTMixError, match=r"^selection=score \(\d+ of 40 examples with score >= 20.0\) leaves \d+ "
                                          r"confident and [01] unconfident examples by the split column 'quality'"):
        recipe.run(cfg, "run")
    assert not trainers and not (tmp_path / "run" / "sftmix").exists()


@pytest.mark.parametrize("subset", ["confident", "unconfident"])
def test_ntp_subset_without_mixup_trains_that_half_alone(tok, tmp_path, subset):
    from sftmix.confidence.split import median_split

    ds = tiny_dataset(32)
    half = median_split(ds["confidence"], ds["guid"]) == (subset == "confident")
    wanted = {g for g, h in zip(ds["guid"], half) if h}
    assert len(wanted) == 16
    tr = make_trainer(tok, tmp_path, ds, per_device_train_batch_size=6, num_train_epochs=2, mixup_weight=0.0,
                      ntp_subset=subset)
    assert not tr.args.mixup_enabled and getattr(tr, "pair_sampler", None) is None
    assert set(tr.train_dataset["guid"]) == wanted and len(tr.train_dataset) == 16
    by_ids = {}
    for g, ids in zip(tr.train_dataset["guid"], tr.train_dataset["input_ids"]):
        by_ids.setdefault(tuple(ids), set()).add(g)
    trained = []
    compute_loss = tr.compute_loss

    def record(model, inputs, *a, **kw):
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
            trained.append(tuple(ids[mask.bool()].tolist()))
        return compute_loss(model, inputs, *a, **kw)

    tr.compute_loss = record
    assert len(tr.get_train_dataloader()) == math.ceil(16 / 6)  # TRL's own sampler, the configured batch
    tr.train()
    assert tr.state.global_step == 2 * math.ceil(16 / 6)  # its own schedule: 3 steps per epoch, not 6
    assert len(trained) == 32 and all(t in by_ids for t in trained)  # confident (resp. unconfident) rows only
    for epoch in (trained[:16], trained[16:]):  # each row of the half once per epoch
        assert sorted(epoch) == sorted(tuple(ids) for ids in tr.train_dataset["input_ids"])
    assert {g for t in trained for g in by_ids[t]} == wanted
    # with Mixup it stays as it was: balanced batches of both halves, the other half only in Mixup
    mix = make_trainer(tok, tmp_path, ds, per_device_train_batch_size=6, max_steps=1, ntp_subset=subset)
    assert len(mix.train_dataset) == 32 and len(mix.get_train_dataloader()) == 6


def test_weak_reference_configs_name_gemma_2_2b(tmp_path):
    from sftmix.config import parse_config

    for path in (ROOT / "configs" / "ablations" / "weak_reference.yaml",
                 ROOT / "configs" / "llama3.1-8b_alpaca_weak-reference.yaml"):
        cfg = parse_config(["--config", str(path), "--output_dir", str(tmp_path / path.stem)])
        assert cfg.run.reference_model == "google/gemma-2-2b" and cfg.run.model == "meta-llama/Llama-3.1-8B"
        text = path.read_text()
        assert "Gemma 2 report" in text and "soft-capping" in text  # the comment says why


def test_sweep_shares_step1_with_a_selection_only_in_the_all_variant(tmp_path):
    from sftmix.config import parse_config
    from sftmix.run.sweep import _keys, run_argv

    abl = ROOT / "configs" / "ablations"
    tiny = abl / "overrides" / "tiny_cpu.yaml"

    def key(stem, *extra):  # the step-1 key: equal keys share one reference run in a sweep
        return _keys(parse_config(run_argv(abl / f"{stem}.yaml", tmp_path / stem, tiny, list(extra))))[0]

    assert key("select_long") != key("baseline")  # step 1 on the selected subset: its own reference
    assert key("select_long") != key("select_random")
    assert key("select_long", "--selection_split", "all") == key("baseline", "--selection_split", "all")
    assert key("ntp_confident") == key("baseline")  # §5.4 still shares the baseline's step 1
