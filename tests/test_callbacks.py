"""sftmix.callbacks: ConfidenceCallback on a plain transformers.Trainer; one-run SFTMix (switch, balance, resume)."""

import random

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from sftmix.callbacks import ConfidenceCallback
from sftmix.data import tokenize_records
from sftmix.dynamics import score_examples
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError, read_jsonl


def make_records(n=16, seed=0):
    rng = random.Random(seed)
    words = ["fix", "the", "grammar", "write", "a", "poem", "about", "rain", "list", "three", "colors", "why"]
    return [
        {"guid": f"g{i:03d}",
         "prompt": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}],
         "completion": [{"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))}]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok_ds():
    tok = build_byte_tokenizer()
    ds, _ = tokenize_records(make_records(16), tok)
    return tok, ds


def test_confidence_callback_on_a_plain_trainer_equals_score_examples_on_the_checkpoint(tmp_path, tok_ds):
    tok, ds = tok_ds
    cb = ConfidenceCallback(ds, tmp_path / "map", steps=[2, 4], batch_size=5)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=3e-3, save_strategy="steps", save_steps=2, report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0)
    train = ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "labels")])
    trainer = Trainer(model=build_tiny_model(tok, seed=0), args=args, train_dataset=train, callbacks=[cb],
                      data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    trainer.train()
    assert cb.scored == [1, 2]
    from transformers import AutoModelForCausalLM

    for k, step in ((1, 2), (2, 4)):
        rows = read_jsonl(tmp_path / "map" / "dynamics" / f"ckpt_{k}.jsonl")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / f"checkpoint-{step}", dtype=torch.float32)
        want = score_examples(model, ds, batch_size=3, show_progress=False)  # another batching: same numbers
        assert [r["guid"] for r in rows] == [r["guid"] for r in want] == list(ds["guid"])
        assert [r["n_tokens"] for r in rows] == [r["n_tokens"] for r in want]
        for got, exp in zip(rows, want):
            assert got["nll_mean"] == pytest.approx(exp["nll_mean"], abs=1e-5)
            assert got["ppl"] == pytest.approx(exp["ppl"], rel=1e-5)
    r1 = read_jsonl(tmp_path / "map" / "dynamics" / "ckpt_1.jsonl")
    r2 = read_jsonl(tmp_path / "map" / "dynamics" / "ckpt_2.jsonl")
    assert any(a["nll_mean"] != pytest.approx(b["nll_mean"], abs=1e-4) for a, b in zip(r1, r2))  # it trained

    # a rerun on the same directory with another schedule is refused, not mixed in
    cb2 = ConfidenceCallback(ds, tmp_path / "map", steps=[1, 4])
    trainer = Trainer(model=build_tiny_model(tok, seed=0), args=args, train_dataset=train, callbacks=[cb2],
                      data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    with pytest.raises(SFTMixError, match="another schedule"):
        trainer.train()


def test_confidence_callback_arguments_are_checked(tok_ds):
    with pytest.raises(SFTMixError, match="either steps"):
        ConfidenceCallback(tok_ds[1], "x")
    with pytest.raises(SFTMixError, match="increasing"):
        ConfidenceCallback(tok_ds[1], "x", steps=[3, 2])
