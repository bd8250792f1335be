"""Evaluation on the tiny random model: multiple-choice scores equal a plain full-logits computation, shots never
come from the evaluated split, loaders check their formats, held-out NLL and batched generation are exact."""

import json
import math
import random

import pytest
import torch

from sftmix.config import EvalConfig
from sftmix.eval.evaluate import heldout_nll, run_eval
from sftmix.eval.generation import generate
from sftmix.eval.mc import eval_multiple_choice, score_choices, wilson_interval
from sftmix.eval.tasks import MCItem, load_mc, pick_shots, split_shots
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError, read_jsonl


@pytest.fixture(scope="module")
def tiny():
    tok = build_byte_tokenizer()
    return build_tiny_model(tok, seed=0), tok


def _reference_logprob(model, tok, prompt, choice, max_length=None, longest=None):
    """Independent: one plain forward over prompt+choice, full logits, no cache, no padding."""
    p = tok(prompt).input_ids
    c = tok(choice, add_special_tokens=False).input_ids
    if max_length is not None and len(p) + longest > max_length:
        p = p[-(max_length - longest):]
    with torch.no_grad():
        logp = model(torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(p) - 1 + t, c[t]]) for t in range(len(c)))


def _prompts(n=7, seed=0):
    rng = random.Random(seed)
    shots = "Question: what is red?\nA. sky\nB. blood\nAnswer: B\n\n" * 2  # a shared prefix, like k fixed shots
    return [shots + "Question: " + " ".join(rng.choice(["cat", "dog", "sun"]) for _ in range(rng.randint(1, 12)))
            + "\nAnswer:" for _ in range(n)]


def _flat(x):
    return [v for row in x for v in row]


def test_mc_scores_equal_full_forward(tiny):
    model, tok = tiny
    prompts = _prompts()
    choices = [[" yes", " no", " maybe", "A"]] * len(prompts)  # multi-token and single-token continuations
    ref = [[_reference_logprob(model, tok, p, c) for c in cs] for p, cs in zip(prompts, choices)]
    for share_prefix, batch_size in [(True, 3), (False, 3), (True, 1), (False, 8)]:
        res = score_choices(model, tok, prompts, choices, batch_size=batch_size, share_prefix=share_prefix,
                            show_progress=False)
        assert _flat(res["logprobs"]) == pytest.approx(_flat(ref), abs=1e-4), (share_prefix, batch_size)
        assert (res["stats"]["shared_prefix_tokens"] > 0) == share_prefix  # the prefix path really ran
        assert res["n_tokens"][0] == [4, 3, 6, 1] and not any(res["truncated"])


def test_mc_left_truncation_equals_full_forward_on_kept_tokens(tiny):
    model, tok = tiny
    prompts = _prompts(5, seed=1)
    choices = [[" yes", " no"]] * len(prompts)
    res = score_choices(model, tok, prompts, choices, batch_size=2, max_length=100, show_progress=False)
    ref = [[_reference_logprob(model, tok, p, c, 100, 4) for c in cs] for p, cs in zip(prompts, choices)]
    assert all(res["truncated"]) and res["stats"]["n_truncated"] == 5
    assert _flat(res["logprobs"]) == pytest.approx(_flat(ref), abs=1e-4)


def _pubmedqa(path, n=12, seed=0, start=0):
    rng = random.Random(seed)
    data = {}
    for i in range(start, start + n):
        data[str(10_000 + i)] = {
            "QUESTION": f"Does treatment {i} work?",
            "CONTEXTS": [f"Study {i} of {rng.randint(5, 500)} patients.", "Results were mixed."],
            "final_decision": ["yes", "no", "maybe"][i % 3],
        }
    path.write_text(json.dumps(data))
    return path


def test_shots_never_come_from_the_evaluated_split(tmp_path):
    items = load_mc("pubmedqa", str(_pubmedqa(tmp_path / "p.json", n=30)))
    shots, evaluated, info = split_shots(items, None, 3)
    assert len(shots) == 3 and len(evaluated) == 27
    assert not {s.id for s in shots} & {e.id for e in evaluated}
    assert sorted(info["shot_answers"]) == ["maybe", "no", "yes"]  # label-balanced
    # deterministic: independent of the file order
    shots2, _, _ = split_shots(list(reversed(items)), None, 3)
    assert [s.id for s in shots2] == [s.id for s in shots]

    # a shots file that overlaps the evaluated one (same id, or same question under another id)
    pool = [MCItem(items[0].id, "other text", ["yes", "no", "maybe"], 0),
            MCItem("dup-of-1", items[1].text, ["yes", "no", "maybe"], 1)]
    pool += load_mc("pubmedqa", str(_pubmedqa(tmp_path / "dev.json", n=6, start=100)))
    shots, evaluated, info = split_shots(items, pool, 3)
    assert info["n_pool_overlap"] == 2 and len(evaluated) == 30
    assert not {s.id for s in shots} & {e.id for e in items}
    assert not {s.content_key for s in shots} & {e.content_key for e in items}


def test_pick_shots_fills_up_after_one_per_label():
    pool = [MCItem(f"q{i}", f"text {i}", ["A", "B"], i % 2) for i in range(10)]
    shots = pick_shots(pool, 5)
    assert len(shots) == 5 and {s.choices[s.answer] for s in shots} == {"A", "B"}


def test_eval_multiple_choice_end_to_end(tiny, tmp_path):
    model, tok = tiny
    path = _pubmedqa(tmp_path / "p.json", n=14)
    cfg = EvalConfig(num_shots=3, batch_size=4)
    m = eval_multiple_choice(model, tok, "pubmedqa", str(path), cfg=cfg, output_dir=tmp_path)
    preds = read_jsonl(tmp_path / "pubmedqa_predictions.jsonl")
    assert m["n"] == len(preds) == 11
    assert not {p["id"] for p in preds} & set(m["shot_ids"])
    k = sum(p["correct"] for p in preds)
    assert m["accuracy"] == pytest.approx(k / 11) and m["ci95"] == pytest.approx(wilson_interval(k, 11))
    for p in preds:  # the prediction is the argmax of the recorded scores
        assert p["pred"] == ["yes", "no", "maybe"][max(range(3), key=lambda j: p["logprobs"][j])]
    # chat-rendered shots go through the same scorer
    m2 = eval_multiple_choice(model, tok, "pubmedqa", str(path), cfg=EvalConfig(mc_chat_template=True))
    assert m2["prompt_format"] == "chat" and m2["n"] == 11


def test_wilson_interval_values():
    # (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.95996..., worked out by hand
    for (k, n), want in {(8, 10): (0.49016247, 0.94331785), (0, 5): (0.0, 0.43448246),
                         (250, 497): (0.45920646, 0.54678346)}.items():
        assert wilson_interval(k, n) == pytest.approx(want, abs=1e-8)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_medqa_and_medmcqa_loaders(tmp_path):
    q = {"question": "Which?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "C"}
    (tmp_path / "m4.jsonl").write_text(json.dumps(q) + "\n" + json.dumps({**q, "question": "Other?"}) + "\n")
    items = load_mc("medqa", str(tmp_path / "m4.jsonl"))
    assert items[0].answer == 2 and items[0].choices == ["A", "B", "C", "D"]
    assert items[0].text == "Question: Which?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    with pytest.raises(SFTMixError, match="medqa_file"):
        load_mc("medqa5", str(tmp_path / "m4.jsonl"))
    bad = {**q, "answer_idx": "E"}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(SFTMixError, match=r"bad\.jsonl: line 1: answer_idx"):
        load_mc("medqa", str(tmp_path / "bad.jsonl"))

    rows = [{"id": f"x{i}", "question": f"q{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": c}
            for i, c in enumerate([1, 2, 4, 3])]
    (tmp_path / "mm1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [it.answer for it in load_mc("medmcqa", str(tmp_path / "mm1.jsonl"))] == [0, 1, 3, 2]  # official: 1-4
    (tmp_path / "mm0.jsonl").write_text("".join(json.dumps({**r, "cop": r["cop"] - 1}) + "\n" for r in rows))
    assert [it.answer for it in load_mc("medmcqa", str(tmp_path / "mm0.jsonl"))] == [0, 1, 3, 2]  # HF: 0-3
    (tmp_path / "amb.jsonl").write_text("".join(json.dumps({**r, "cop": 2}) + "\n" for r in rows))
    with pytest.raises(SFTMixError, match="medmcqa_cop_base"):
        load_mc("medmcqa", str(tmp_path / "amb.jsonl"))
    cfg = EvalConfig(medmcqa_cop_base="1")
    assert [it.answer for it in load_mc("medmcqa", str(tmp_path / "amb.jsonl"), cfg)] == [1] * 4


def test_pubmedqa_bad_record_names_file_and_record(tmp_path):
    path = _pubmedqa(tmp_path / "p.json", n=3)
    data = json.loads(path.read_text())
    data["10001"]["final_decision"] = "perhaps"
    path.write_text(json.dumps(data))
    with pytest.raises(SFTMixError, match=r"p\.json: record 10001: final_decision"):
        load_mc("pubmedqa", str(path))


def test_heldout_nll_equals_independent_loss(tiny):
    from helpers import tiny_records

    from sftmix.data import tokenize_records

    model, tok = tiny
    records = tiny_records(9, seed=3, with_confidence=False)
    m = heldout_nll(model, tok, records, batch_size=4)
    ds, _ = tokenize_records(records, tok)
    tot_nll, tot_tok, per_ex = 0.0, 0, []
    with torch.no_grad():
        for row in ds:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            tgt = labels[0, 1:]
            keep = tgt != -100
            nll = -logp[keep].gather(-1, tgt[keep][:, None]).sum().item()
            tot_nll, tot_tok = tot_nll + nll, tot_tok + int(keep.sum())
            per_ex.append(nll / int(keep.sum()))
    assert m["n_examples"] == 9 and m["n_tokens"] == tot_tok
    assert m["nll"] == pytest.approx(tot_nll / tot_tok, rel=1e-4)
    assert m["nll_example_mean"] == pytest.approx(sum(per_ex) / 9, rel=1e-4)
    assert m["ppl"] == pytest.approx(torch.tensor(tot_nll / tot_tok).exp().item(), rel=1e-4)


def test_batched_left_padded_greedy_equals_one_by_one(tiny):
    model, tok = tiny
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question here"}],
             [{"role": "user", "content": "mid length"}]]
    batched = generate(model, tok, convs, max_new_tokens=6, batch_size=3, show_progress=False)
    single = [generate(model, tok, [c], max_new_tokens=6, batch_size=1, show_progress=False)[0] for c in convs]
    assert [g["text"] for g in batched] == [g["text"] for g in single]
    assert all(g["n_tokens"] <= 6 for g in batched)


def test_run_eval_writes_results_and_reuses_them(tiny, tmp_path, monkeypatch):
    import sftmix.eval.mc as mc  # where eval_multiple_choice looks score_choices up

    model, tok = tiny
    cfg = EvalConfig(pubmedqa_file=str(_pubmedqa(tmp_path / "p.json", n=8)), num_shots=2)
    res = run_eval(model, tok, cfg, tmp_path / "eval")
    assert res["pubmedqa"]["n"] == 6 and (tmp_path / "eval" / "results.json").exists()
    monkeypatch.setattr(mc, "score_choices", lambda *a, **k: pytest.fail("recomputed a finished task"))
    again = run_eval(model, tok, cfg, tmp_path / "eval")
    assert again["pubmedqa"]["accuracy"] == res["pubmedqa"]["accuracy"]
    with pytest.raises(SFTMixError, match="nothing to evaluate"):
        run_eval(model, tok, EvalConfig(), tmp_path / "eval")
