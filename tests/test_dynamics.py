"""Step 1: scoring, confidence, the split, the reference run (resume, online mode), the join by guid, the plots."""

import json
import random

import numpy as np
import pytest
import torch
from helpers import Interrupt, interrupt_at

from sftmix.confidence import callback as scoring_callback
from sftmix.confidence.callback import build_confidence, scoring_steps
from sftmix.confidence.online import compare_online, online_confidence, online_confidence_rows
from sftmix.confidence.reference import join_confidence, run_reference
from sftmix.confidence.scoring import run_scoring, score_examples
from sftmix.confidence.split import confidence, split_confident, variability
from sftmix.data import ensure_chat_template, tokenize_records
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError, read_jsonl, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_records(n=24, seed=0):
    rng = random.Random(seed)
    words = ["fix", "the", "grammar", "write", "a", "poem", "about", "rain", "list", "three", "colors", "why"]
    return [
        {
            "guid": f"g{i:03d}",
            "prompt": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}],
            "completion": [{"role": "assistant",
                            "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))}],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny():
    tok = build_byte_tokenizer()
    return tok, build_tiny_model(tok, seed=0)


@pytest.fixture(scope="module")
def scored_ds(tiny):
    ds, _ = tokenize_records(make_records(13), tiny[0])
    return ds


def reference_nll(model, row):
    """Independent computation: one example, no padding, full logits, log_softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([row["input_ids"]])).logits[0].double()
    labels = torch.tensor(row["labels"])
    logp = torch.log_softmax(logits[:-1], -1)
    targets = labels[1:]
    mask = targets != -100
    return -logp[mask].gather(-1, targets[mask][:, None]).mean().item(), int(mask.sum())


# -- scoring -----------------------------------------------------------------------------------------------------------


def test_scores_match_independent_full_logits_computation(tiny, scored_ds):
    tok, model = tiny
    rows = score_examples(model, scored_ds, batch_size=4, show_progress=False)
    assert [r["guid"] for r in rows] == list(scored_ds["guid"])  # dataset order, not length order
    for r, ex in zip(rows, scored_ds):
        nll, n = reference_nll(model, ex)
        assert r["n_tokens"] == n == ex["n_response_tokens"]
        assert r["nll_mean"] == pytest.approx(nll, abs=1e-5)
        assert r["ppl"] == pytest.approx(np.exp(nll), rel=1e-5)


@pytest.fixture(scope="module")
def gpt2(tiny):
    """A model with absolute position embeddings: left padding is only right with correct position ids (RoPE models
    are blind to a uniform shift of positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny[0]
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                      pad_token_id=tok.pad_token_id)).eval()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_scores_invariant_to_batch_size_and_padding_side(tiny, gpt2, scored_ds, which):
    model = tiny[1] if which == "llama" else gpt2
    base = np.array([r["nll_mean"] for r in score_examples(model, scored_ds, batch_size=1, show_progress=False)])
    assert base == pytest.approx([reference_nll(model, ex)[0] for ex in scored_ds], abs=1e-5)
    for bs in (3, 16):
        for side in ("right", "left"):
            res = run_scoring(model, scored_ds, batch_size=bs, padding_side=side, show_progress=False)
            np.testing.assert_allclose([r["nll_mean"] for r in res.rows], base, atol=1e-5)
            assert 0 < res.stats["padding_fraction"] < 0.5 and res.stats["tokens_per_s"] > 0
    # a plain list of dicts gives the same scores as the datasets.Dataset
    as_list = [dict(r) for r in scored_ds]
    np.testing.assert_allclose([r["nll_mean"] for r in score_examples(model, as_list, 5, show_progress=False)],
                               base, atol=1e-5)


def test_length_sorted_buckets_compute_little_padding(tiny):
    tok, model = tiny
    ds, _ = tokenize_records(make_records(64, seed=3), tok)
    sorted_pad = run_scoring(model, ds, batch_size=8, show_progress=False).stats["padding_fraction"]
    lengths = [len(x) for x in ds["input_ids"]]
    # padding an unsorted batching would compute: each batch of 8 in dataset order padded to its longest
    unsorted = [lengths[i : i + 8] for i in range(0, len(lengths), 8)]
    unsorted_pad = 1 - sum(lengths) / sum(max(b) * len(b) for b in unsorted)
    assert sorted_pad < unsorted_pad / 3


def test_scoring_restores_train_mode_and_builds_no_graph(tiny, scored_ds):
    _, model = tiny
    model.train()
    res = run_scoring(model, scored_ds, batch_size=4, hidden_at="last_response", show_progress=False)
    assert model.training
    assert res.hidden.shape == (len(scored_ds), model.config.hidden_size) and np.isfinite(res.hidden).all()
    model.eval()


def test_lm_head_bias_and_softcapping_are_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = build_byte_tokenizer()
    ds, _ = tokenize_records(make_records(6), tok)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                       pad_token_id=tok.pad_token_id, attn_implementation="eager")
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(cfg).eval()
    llama = build_tiny_model(tok, seed=1).eval()
    llama.lm_head = torch.nn.Linear(64, len(tok), bias=True)
    torch.nn.init.normal_(llama.lm_head.bias, std=3.0)  # large enough that ignoring it would show
    for model in (gemma, llama):
        rows = score_examples(model, ds, batch_size=4, show_progress=False)
        for r, ex in zip(rows, ds):
            assert r["nll_mean"] == pytest.approx(reference_nll(model, ex)[0], abs=1e-5)


def test_example_without_response_tokens_is_an_error(tiny):
    _, model = tiny
    bad = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100], "guid": "empty"},
           {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "guid": "ok"}]
    with pytest.raises(SFTMixError, match="1 of 2 examples have no response tokens.*'empty'"):
        score_examples(model, bad, show_progress=False)
    with pytest.raises(SFTMixError, match="no guid column"):
        score_examples(model, [{"input_ids": [1, 2], "labels": [1, 2]}], show_progress=False)


# -- confidence and split ----------------------------------------------------------------------------------------------


def test_confidence_is_minus_mean_ppl_and_variability_is_std():
    ppl = np.array([[2.0, 10.0, 4.0], [4.0, 6.0, 4.0]])
    np.testing.assert_allclose(confidence(ppl), [-3.0, -8.0, -4.0])
    np.testing.assert_allclose(variability(ppl), [1.0, 2.0, 0.0])
    with pytest.raises(SFTMixError, match="shape"):
        confidence(np.ones(3))


def test_split_is_balanced_deterministic_and_order_independent():
    rng = np.random.default_rng(0)
    for n in (10, 11, 2, 3):
        conf = rng.choice([-3.0, -2.0, -1.5, -1.0], size=n)  # many ties, some straddling the median
        conf[0] = -10.0  # not all identical
        guids = [f"x{i}" for i in rng.permutation(n)]
        confident = split_confident(conf, guids)
        assert confident.sum() == n // 2  # odd N: the median example is unconfident
        # every confident example is at least as confident as every unconfident one
        assert conf[confident].min() >= conf[~confident].max()
        perm = rng.permutation(n)
        again = split_confident(conf[perm], [guids[i] for i in perm])
        assert {guids[i] for i in perm[again]} == {g for g, c in zip(guids, confident) if c}
    # ties at the boundary go to the smaller guid
    assert split_confident([1.0, 1.0, 1.0, 0.0], ["b", "a", "c", "d"]).tolist() == [True, True, False, False]
    # odd N: floor(N/2) confident, the median example unconfident
    assert split_confident([3.0, 2.0, 1.0], ["a", "b", "c"]).tolist() == [True, False, False]


def test_identical_confidence_is_an_error():
    with pytest.raises(SFTMixError, match="same confidence.*train the reference longer"):
        split_confident(np.full(6, -4.2), list("abcdef"))


def test_scoring_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert scoring_steps(10, 5) == [2, 4, 6, 8, 10]
    assert scoring_steps(7, 3) == [3, 5, 7]
    assert scoring_steps(5, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(SFTMixError, match="only 3 optimizer steps"):
        scoring_steps(3, 5)


def _write_ckpts(run, ppl, guids):
    for k, row in enumerate(ppl, start=1):
        write_jsonl(run / "dynamics" / f"ckpt_{k}.jsonl",
                    [{"guid": g, "nll_mean": float(np.log(p)), "n_tokens": 3, "ppl": float(p)}
                     for g, p in zip(guids, row)])


def test_build_confidence_rows_and_clear_errors(tmp_path):
    guids = [f"g{i}" for i in range(6)]
    ppl = np.array([[5.0, 3, 9, 2, 7, 4], [3.0, 3, 7, 2, 5, 2]])
    _write_ckpts(tmp_path, ppl, guids)
    rows = build_confidence(tmp_path)
    assert rows == read_jsonl(tmp_path / "confidence.jsonl")
    assert list(rows[0]) == ["guid", "n_tokens", "confidence", "variability", "ppl_1", "ppl_2", "confident"]
    assert [r["confident"] for r in rows] == [False, True, False, True, False, True]
    assert rows[0]["confidence"] == -4.0 and rows[0]["variability"] == 1.0
    with pytest.raises(SFTMixError, match="ckpt_3.jsonl missing"):
        build_confidence(tmp_path, num_checkpoints=3)
    write_jsonl(tmp_path / "dynamics" / "ckpt_2.jsonl", [{"guid": "other", "nll_mean": 1, "n_tokens": 1, "ppl": 2.7}])
    with pytest.raises(SFTMixError, match="other examples than ckpt_1"):
        build_confidence(tmp_path)


def test_confidence_jsonl_is_never_truncated(tmp_path, monkeypatch):
    guids = [f"g{i}" for i in range(8)]
    _write_ckpts(tmp_path, np.arange(1, 17, dtype=float).reshape(2, 8), guids)
    good = build_confidence(tmp_path)
    before = (tmp_path / "confidence.jsonl").read_bytes()
    import sftmix.utils

    _write_ckpts(tmp_path, np.arange(16, 0, -1, dtype=float).reshape(2, 8), guids)
    calls = {"n": 0}

    class DyingJson:  # the writer "dies" after 3 rows of the new confidence.jsonl
        loads, JSONDecodeError = staticmethod(json.loads), json.JSONDecodeError

        @staticmethod
        def dumps(*a, **kw):
            calls["n"] += 1
            if calls["n"] > 3:
                raise Interrupt
            return json.dumps(*a, **kw)

    monkeypatch.setattr(sftmix.utils, "json", DyingJson)
    with pytest.raises(Interrupt):
        build_confidence(tmp_path)
    monkeypatch.undo()
    assert calls["n"] == 4
    assert (tmp_path / "confidence.jsonl").read_bytes() == before
    assert good == read_jsonl(tmp_path / "confidence.jsonl")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- join by guid (a reference with another tokenizer) -----------------------------------------------------------------


def test_reference_with_another_tokenizer_joins_back_by_guid(tmp_path):
    records = make_records(20, seed=5)
    target_tok = build_byte_tokenizer()  # ChatML
    ref_tok = build_byte_tokenizer(chat_template=False)
    assert ensure_chat_template(ref_tok, "plain") == "plain"  # "### Instruction: ... ### Response:"
    target_ds, _ = tokenize_records(records, target_tok)
    ref_ds, _ = tokenize_records(records[::-1], ref_tok)  # another tokenization and another order
    assert target_ds[0]["input_ids"] != ref_ds[len(ref_ds) - 1]["input_ids"]

    ref_model = build_tiny_model(ref_tok, seed=3, hidden_size=32)
    ppl = [[r["ppl"] for r in score_examples(ref_model, ref_ds, 8, show_progress=False)]]
    _write_ckpts(tmp_path, np.array(ppl), list(ref_ds["guid"]))
    rows = build_confidence(tmp_path)

    joined = join_confidence(target_ds, rows)
    by_guid = {r["guid"]: r for r in rows}
    assert joined["input_ids"] == target_ds["input_ids"]  # the target's own tokens
    assert joined["confident"] == [by_guid[g]["confident"] for g in target_ds["guid"]]
    assert sum(joined["confident"]) == 10
    recs = join_confidence(records, rows)
    assert [r["confidence"] for r in recs] == [by_guid[r["guid"]]["confidence"] for r in records]

    other = make_records(20, seed=6)
    for r in other[:15]:
        r["guid"] += "-other"
    with pytest.raises(SFTMixError, match="only 5 of 20 examples have a confidence row"):
        join_confidence(other, rows)
    assert len(join_confidence(other, rows, missing="drop")) == 5


# -- online mode -------------------------------------------------------------------------------------------------------


def test_online_confidence_from_synthetic_records():
    guids = ["a", "b", "c", "d"]
    recs = [
        {"example_idx": 0, "global_step": 0, "epoch": 0.0, "nll_mean": np.log(2.0), "n_tokens": 3},
        {"example_idx": 1, "global_step": 0, "epoch": 0.0, "nll_mean": np.log(8.0), "n_tokens": 3},
        {"example_idx": 2, "global_step": 1, "epoch": 0.5, "nll_mean": np.log(4.0), "n_tokens": 3},
        {"example_idx": 0, "global_step": 2, "epoch": 1.0, "nll_mean": np.log(4.0), "n_tokens": 3},
        {"example_idx": 1, "global_step": 2, "epoch": 1.0, "nll_mean": np.log(2.0), "n_tokens": 3},
    ]
    out = online_confidence(recs, guids)
    np.testing.assert_allclose(out["confidence"][:3], [-3.0, -5.0, -4.0])
    assert np.isnan(out["confidence"][3]) and out["unseen"] == 1 and out["occurrences"].tolist() == [2, 2, 1, 0]
    last = online_confidence(recs, guids, epochs="last")  # epoch 1.0 is the first step of the second epoch
    np.testing.assert_allclose(last["confidence"][:3], [-4.0, -2.0, -4.0])
    cmp = compare_online(out["confidence"], np.array([-1.0, -9.0, -4.0, 0.0]), guids)
    assert cmp["spearman"] == pytest.approx(1.0) and cmp["n"] == 3 and cmp["unseen"] == 1
    with pytest.raises(SFTMixError, match="outside the 2 examples"):
        online_confidence(recs, guids[:2])



def test_relative_online_confidence_removes_the_drift_of_the_model_over_the_epoch():
    """One-run SFTMix's confidence: an example is compared with the examples its own optimizer step saw. A model
    that divides every PPL by 8 from one step to the next makes the late steps' examples look confident in absolute
    terms; the step-relative PPL ranks by what the examples are (here: the second of each step is 4x harder)."""
    guids = [f"g{i}" for i in range(6)]
    recs = [{"example_idx": 2 * s + j, "global_step": s, "epoch": s / 3,
             "nll_mean": np.log(8.0 / 8**s * (4 if j else 1)), "n_tokens": 5 + j} for s in range(3) for j in range(2)]
    raw = online_confidence(recs, guids)["confidence"]
    assert np.argsort(-raw).tolist() == [4, 5, 2, 3, 0, 1]  # the last step's examples look best
    rel = online_confidence(recs, guids, relative=True)["confidence"]
    np.testing.assert_allclose(rel, [-0.5, -2.0] * 3)  # exp(+-log 2) around each step's mean log-PPL
    rows = online_confidence_rows(recs, guids, relative=True)
    assert [r["confident"] for r in rows] == [True, False] * 3
    assert [r["n_tokens"] for r in rows] == [5, 6] * 3 and rows[1]["ppl_1"] == pytest.approx(32.0)


def test_linear_online_confidence_removes_the_drift_without_the_noise_of_one_step():
    """relative="linear" (self_confidence=online_linear, issue 27): a line fitted over the steps removes a steady
    drift, and unlike the step's mean it does not erase what a step's examples share: here each step holds two
    examples of the same kind (steps alternate hard, easy), which the step-relative PPL makes all alike."""
    guids = [f"g{i}" for i in range(16)]
    hard = [s % 2 == 0 for s in range(8)]
    recs = [{"example_idx": 2 * s + j, "global_step": s, "epoch": s / 8,
             "nll_mean": 3.0 - 0.4 * s + (1.0 if hard[s] else 0.0), "n_tokens": 5} for s in range(8) for j in range(2)]
    rel = online_confidence(recs, guids, relative=True)["confidence"]
    np.testing.assert_allclose(rel, -1.0)  # every example at its step's mean: no information left
    lin = online_confidence(recs, guids, relative="linear")["confidence"]
    rows = online_confidence_rows(recs, guids, relative="linear")
    assert [r["confident"] for r in rows] == [not hard[i // 2] for i in range(16)]
    assert [r["confidence"] for r in rows] == pytest.approx(lin.tolist())
    raw = online_confidence(recs, guids)["confidence"]
    assert [bool(x) for x in raw > np.median(raw)] != [not hard[i // 2] for i in range(16)]  # the drift misleads raw
    # two epochs: one line each (the second epoch's lower NLL is not read as every example being easier)
    two = recs + [{**r, "global_step": r["global_step"] + 8, "epoch": 1 + r["epoch"],
                   "nll_mean": r["nll_mean"] - 1.5} for r in recs]
    np.testing.assert_allclose(online_confidence(two, guids, relative="linear")["confidence"], lin)
    with pytest.raises(SFTMixError, match="relative must be False, True, 'step' or 'linear'; got 'cubic'"):
        online_confidence(recs, guids, relative="cubic")

# -- the whole reference step ------------------------------------------------------------------------------------------


REF_KW = dict(num_checkpoints=4, per_device_train_batch_size=2, learning_rate=3e-3, show_progress=False, seed=1)


def test_run_reference_resumes_and_skips_scored_checkpoints(tmp_path, monkeypatch):
    tok = build_byte_tokenizer()
    records = make_records(16, seed=2)
    ds, _ = tokenize_records(records, tok)  # 16 examples, batch 2: 8 steps, checkpoints at steps 2, 4, 6, 8
    calls = []
    real = scoring_callback.run_scoring

    def counting(*a, **kw):
        calls.append(kw["desc"])
        return real(*a, **kw)

    monkeypatch.setattr(scoring_callback, "run_scoring", counting)
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_reference(build_tiny_model(tok, seed=0), tok, ds, run, callbacks=[interrupt_at(5)],
                      scoring_checkpoints="always", **REF_KW)
    assert calls == ["scoring step 1/4", "scoring step 2/4"]
    assert not (run / "confidence.jsonl").exists()
    assert (run / "reference" / "checkpoint-4").is_dir()  # saved at the scoring step, whatever save_strategy says
    # a kill while saving leaves a newer, half-written checkpoint: resume must skip it (and remove it)
    torn = run / "reference" / "checkpoint-6"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 10)

    calls.clear()
    rows = run_reference(build_tiny_model(tok, seed=0), tok, ds, run, scoring_checkpoints="always", **REF_KW)
    assert calls == ["scoring step 3/4", "scoring step 4/4"]  # 1 and 2 were not scored again
    assert all((c / "trainer_state.json").exists() for c in (run / "reference").glob("checkpoint-*"))
    assert len(rows) == 16 and sum(r["confident"] for r in rows) == 8
    assert rows == read_jsonl(run / "confidence.jsonl")
    # the caller draws the plots (sftmix.run.pipeline.stage_dynamics: step 1 imports nothing from the report); the
    # hidden-state map is drawn from dynamics/hidden_final.npz, which the last scoring step wrote
    from sftmix.report.plots import write_dynamics_plots

    write_dynamics_plots(run, rows, records=records, dataset=ds, tokenizer=tok)
    for name in ("confidence_hist.png", "data_map.png", "hidden_map.png"):
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    md = (run / "plots" / "confidence_summary.md").read_text()
    top = max(rows, key=lambda r: (r["confidence"], r["guid"]))
    assert next(r for r in records if r["guid"] == top["guid"])["prompt"][0]["content"][:40] in md

    calls.clear()  # done: a third call scores nothing and returns the same rows
    assert run_reference(build_tiny_model(tok, seed=0), tok, ds, run, **REF_KW) == rows and calls == []

    # the interrupted + resumed run equals an uninterrupted one with the same seed
    fresh = run_reference(build_tiny_model(tok, seed=0), tok, ds, tmp_path / "fresh", **REF_KW)
    np.testing.assert_allclose([r["confidence"] for r in fresh], [r["confidence"] for r in rows], rtol=1e-4)
    assert [r["confident"] for r in fresh] == [r["confident"] for r in rows]
    # training changed the model: ppl moves between checkpoints
    assert any(r["ppl_1"] != pytest.approx(r["ppl_4"], rel=1e-3) for r in rows)


@pytest.mark.parametrize("save", ["steps", "no"])
def test_default_saves_as_the_trainer_says_and_a_resume_rescores_correctly(tmp_path, monkeypatch, caplog, save):
    """scoring_checkpoints="trainer" (the default) forces no save at the scoring steps. A run killed at step 7 resumes
    from the Trainer's own checkpoint-5 (save_steps=5), or from step 0 without saves, retrains to the missing scoring
    steps, scores only those, says so in one line, and ends with the confidences of an uninterrupted run."""
    import logging

    tok = build_byte_tokenizer()
    ds, _ = tokenize_records(make_records(16, seed=2), tok)  # 8 steps, scoring at 2, 4, 6, 8
    calls = []
    real = scoring_callback.run_scoring
    monkeypatch.setattr(scoring_callback, "run_scoring", lambda *a, **kw: calls.append(kw["desc"]) or real(*a, **kw))
    kw = dict(REF_KW, save_strategy=save, save_steps=5)
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_reference(build_tiny_model(tok, seed=0), tok, ds, run, callbacks=[interrupt_at(7)], **kw)
    assert calls == [f"scoring step {k}/4" for k in (1, 2, 3)]
    saved = sorted(p.name for p in (run / "reference").glob("checkpoint-*"))
    assert saved == (["checkpoint-5"] if save == "steps" else [])  # none at the scoring steps 2, 4, 6
    first = {k: (run / "dynamics" / f"ckpt_{k}.jsonl").read_bytes() for k in (1, 2, 3)}

    calls.clear()
    with caplog.at_level(logging.INFO, logger="sftmix.confidence.callback"):
        rows = run_reference(build_tiny_model(tok, seed=0), tok, ds, run, **kw)
    assert calls == ["scoring step 4/4"]  # 1-3 kept: the retrained steps reproduce the same weights
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming at")]
    start = 5 if save == "steps" else 0
    assert lines == [(f"resuming at step {start}: retraining steps {start + 1}..6 (done before the interruption, past "
                      f"the last saved checkpoint); scoring step(s) [1, 2, 3] already scored (kept), scoring step(s) "
                      f"[4] at optimizer step(s) [8]")]
    assert {k: (run / "dynamics" / f"ckpt_{k}.jsonl").read_bytes() for k in (1, 2, 3)} == first

    fresh = run_reference(build_tiny_model(tok, seed=0), tok, ds, tmp_path / "fresh", **kw)
    np.testing.assert_allclose([r["confidence"] for r in rows], [r["confidence"] for r in fresh], rtol=1e-6)
    assert [r["confident"] for r in rows] == [r["confident"] for r in fresh]
    for k in (1, 2, 3, 4):  # every checkpoint scored at the same weights as the uninterrupted run's
        np.testing.assert_allclose([r["nll_mean"] for r in read_jsonl(run / "dynamics" / f"ckpt_{k}.jsonl")],
                                   [r["nll_mean"] for r in read_jsonl(tmp_path / "fresh" / "dynamics" /
                                                                      f"ckpt_{k}.jsonl")], rtol=1e-6)


def test_scoring_checkpoints_setting_is_checked(tmp_path):
    with pytest.raises(SFTMixError, match="scoring_checkpoints must be one of trainer, always"):
        run_reference(None, build_byte_tokenizer(), tiny_ds(), tmp_path, scoring_checkpoints="sometimes")


def tiny_ds():
    return tokenize_records(make_records(4), build_byte_tokenizer())[0]


def test_plots_are_non_empty_pngs(tmp_path):
    from sftmix.report.plots import plot_hidden_map, write_dynamics_plots

    rng = np.random.default_rng(0)
    n = 40
    rows = [{"guid": f"g{i}", "confidence": float(-c), "variability": float(v), "confident": bool(i % 2)}
            for i, (c, v) in enumerate(zip(rng.uniform(2, 50, n), rng.uniform(0, 5, n)))]
    paths = write_dynamics_plots(tmp_path, rows, records=[
        {"guid": f"g{i}", "prompt": [{"role": "user", "content": f"instruction number {i}"}]} for i in range(n)])
    assert [p.name for p in paths] == ["confidence_hist.png", "data_map.png", "confidence_summary.md"]
    for p in paths[:2]:
        assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 1000
    assert "instruction number" in paths[2].read_text()
    # t-SNE on few points: it is slow when the CPU is oversubscribed
    tsne = plot_hidden_map(rng.normal(size=(12, 8)), [r["confidence"] for r in rows[:12]], tmp_path / "t.png", "tsne")
    assert tsne.read_bytes().startswith(PNG_MAGIC)


def test_online_mode_with_the_real_trainer(tmp_path, monkeypatch):
    tok = build_byte_tokenizer()
    ds, _ = tokenize_records(make_records(8, seed=4), tok)  # 8 examples, batch 2, 2 epochs: 8 steps
    rows = run_reference(build_tiny_model(tok, seed=0), tok, ds, tmp_path, confidence="checkpoints_vs_online",
                         num_train_epochs=2, **REF_KW)
    assert len(list((tmp_path / "dynamics").glob("ckpt_*.jsonl"))) == 4
    summary = json.loads((tmp_path / "dynamics" / "online_summary.json").read_text())
    assert summary["records"] == 16 and summary["n"] == 8 and summary["unseen"] == 0  # each example once per epoch
    assert -1.0 <= summary["spearman"] <= 1.0 and 0.0 <= summary["split_agreement"] <= 1.0
    online = read_jsonl(tmp_path / "dynamics" / "online_confidence.jsonl")
    assert [r["guid"] for r in online] == [r["guid"] for r in rows] and all(r["occurrences"] == 2 for r in online)
    # the recorded NLL is the training forward's: at the first step it equals scoring the initial model
    recs = read_jsonl(tmp_path / "dynamics" / "online_records.jsonl")
    first = [r for r in recs if r["global_step"] == 0]
    init = score_examples(build_tiny_model(tok, seed=0), ds, show_progress=False)
    for r in first:
        assert r["nll_mean"] == pytest.approx(init[r["example_idx"]]["nll_mean"], abs=1e-4)

    # online-only: the same run without any scoring pass gives the same online confidence, now in confidence.jsonl
    calls = []
    real = scoring_callback.run_scoring
    monkeypatch.setattr(scoring_callback, "run_scoring", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    only = run_reference(build_tiny_model(tok, seed=0), tok, ds, tmp_path / "only", confidence="online_only",
                         num_train_epochs=2, **REF_KW)
    assert calls == [] and not list((tmp_path / "only" / "dynamics").glob("ckpt_*.jsonl"))
    assert [r["guid"] for r in only] == [r["guid"] for r in online] and sum(r["confident"] for r in only) == 4
    np.testing.assert_allclose([r["confidence"] for r in only], [r["online_confidence"] for r in online], rtol=1e-5)
    assert set(only[0]) == {"guid", "n_tokens", "confidence", "variability", "ppl_1", "ppl_2", "confident"}
    assert "spearman" not in json.loads((tmp_path / "only" / "dynamics" / "online_summary.json").read_text())
    with pytest.raises(SFTMixError, match="needs online=True"):  # the earlier flag keywords are still read
        run_reference(None, tok, ds, tmp_path / "x", score_checkpoints=False)
    with pytest.raises(SFTMixError, match="confidence must be one of checkpoints, checkpoints_vs_online, online, "
                                          "online_only; got 'scored'"):
        run_reference(None, tok, ds, tmp_path / "x", confidence="scored")


def test_run_reference_reads_the_earlier_flag_keywords_as_its_one_choice():
    from sftmix.confidence.reference import _legacy_confidence

    for flags, choice in (({}, None), ({"online": False}, "checkpoints"), ({"online": True}, "checkpoints_vs_online"),
                          ({"online": True, "online_split": True}, "online"),
                          ({"online": True, "score_checkpoints": False}, "online_only"),
                          ({"online_split": True}, "checkpoints")):  # online_split alone was ignored, as before
        kw = {**flags, "bf16": False}
        assert _legacy_confidence(kw) == choice, flags
        assert kw == {"bf16": False}  # popped: they never reach the SFTMixConfig
