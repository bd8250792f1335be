"""A Gemma-2 reference for step 1 (paper §5.1, weak_reference.yaml): its final logit soft-capping must be applied
wherever step 1 reads the LM head: checkpoint scoring (sftmix.confidence.scoring.run_scoring, which calls the head
itself), the
reference's NTP training (TRL's fused head) and the online records. A tiny random Gemma2 built here, with a small cap
and a large head so that the cap changes every log-probability."""

import pytest
import torch
from helpers import tiny_records

from sftmix import SFTMixConfig, SFTMixTrainer
from sftmix.confidence.scoring import run_scoring
from sftmix.data import ensure_chat_template, tokenize_records
from sftmix.models import build_byte_tokenizer
from sftmix.utils import SFTMixError

CAP = 2.0


@pytest.fixture(scope="module")
def setup():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = build_byte_tokenizer()
    ensure_chat_template(tok, "auto")
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                       final_logit_softcapping=CAP, tie_word_embeddings=False, sliding_window=16)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(200)  # raw logits of ~100: the cap of 2 changes them all
    ds, _ = tokenize_records(tiny_records(6), tok, max_length=128)
    return model, tok, ds


def _hf_nll(model, ex, capped=True):
    """Mean response NLL of one example from the model's own forward (Gemma2ForCausalLM applies the cap)."""
    ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits if capped else model.lm_head(model.model(input_ids=ids).last_hidden_state)
    logp = torch.log_softmax(logits[0, :-1].float(), -1)
    t = labels[0, 1:]
    mask = t != -100
    return -logp[mask].gather(-1, t[mask][:, None]).mean().item()


def test_scoring_applies_final_logit_softcapping(setup):
    model, _, ds = setup
    rows = run_scoring(model, ds, batch_size=4, show_progress=False).rows  # padded batches, its own LM-head pass
    for row, ex in zip(rows, ds):
        assert row["nll_mean"] == pytest.approx(_hf_nll(model, ex), rel=1e-5)
        assert abs(_hf_nll(model, ex, capped=False) - row["nll_mean"]) > 10  # the cap matters here


@pytest.mark.parametrize("online", [False, True], ids=["checkpoints", "online"])
def test_reference_ntp_training_and_online_records_apply_it(setup, tmp_path, online):
    model, tok, ds = setup
    args = SFTMixConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, mixup_weight=0.0,
                        record_online_dynamics=online, report_to=[], save_strategy="no", bf16=False,
                        disable_tqdm=True, learning_rate=0.0)
    # the reference of step 1: SFTMixTrainer with mixup_weight=0 (online mode records NLLs from its passes)
    tr = SFTMixTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(tr.get_train_dataloader()))
    model.train()
    try:
        loss = tr.compute_loss(model, {k: v.clone() for k, v in batch.items()})
    finally:
        model.eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    if online:
        assert len(tr.online_records) == 3
        for rec in tr.online_records:
            assert rec["nll_mean"] == pytest.approx(_hf_nll(model, ds[rec["example_idx"]]), rel=1e-5)


def test_softcapped_target_with_mixup_is_still_refused(setup, tmp_path):
    model, tok, ds = setup
    args = SFTMixConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], save_strategy="no",
                        bf16=False, disable_tqdm=True)
    with pytest.raises(SFTMixError, match="soft-capping"):
        SFTMixTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)  # ds has a `confidence`
