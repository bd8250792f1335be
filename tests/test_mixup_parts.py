"""The Mixup trainer in parts (sftmix.mixup.*): a Trainer subclass gets SFTMix by putting the mixin first (no calls
before or after the Trainer's __init__; code written for those calls still prepares once), the non-finite guard works
on a plain transformers.Trainer, one-run SFTMix is given its SelfReferenceCallback explicitly (self_reference=), and
the captured loss forward keeps its signature and survives accelerate's mixed-precision wrapper."""

import pytest
import torch
from helpers import tiny_records
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from sftmix.data import tokenize_records
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError

COMMON = dict(report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-3, bf16=False,
              gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def rows(tok, n=16):
    return tokenize_records(tiny_records(n), tok)[0]  # input_ids, labels, guid, a float `confidence`


def test_a_trainer_subclass_gets_sftmix_by_putting_the_mixin_first(tok, tmp_path):
    """`class T(SFTMixMixin, Trainer): pass` prepares the rows (the median split of `confidence` into `confident`,
    `example_idx`), wraps the collator, and trains with the Mixup term, one backbone pass per step; the same first
    Mixup loss as SFTMixHFTrainer on the same batch."""
    from sftmix.mixup.hf import SFTMixHFTrainer, SFTMixTrainingArguments
    from sftmix.mixup.mixin import SFTMixMixin
    from sftmix.mixup.sampling import BalancedPairSampler, SFTMixCollator

    class PlainSFTMix(SFTMixMixin, Trainer):
        pass

    def args(name):
        return SFTMixTrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2,
                                       **COMMON)

    ds = rows(tok)
    ours = PlainSFTMix(build_tiny_model(tok), args("plain"), DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
                       ds, processing_class=tok)  # model, args, collator, train_dataset: the Trainer's positions
    assert {"confident", "example_idx"} <= set(ours.train_dataset.column_names)
    assert sum(ours.train_dataset["confident"]) == 8 and ours.train_dataset["example_idx"] == list(range(16))
    assert isinstance(ours.data_collator, SFTMixCollator)
    assert isinstance(ours._get_train_sampler(), BalancedPairSampler)
    ref = SFTMixHFTrainer(model=build_tiny_model(tok), args=args("hf"), train_dataset=ds, processing_class=tok)
    batch = next(iter(ref.get_train_dataloader()))
    for t in (ours, ref):
        t.model.train()
        t.compute_loss(t.model, {k: v.clone() for k, v in batch.items()})
    assert ours._metrics["train"]["mixup_loss"][-1] == pytest.approx(ref._metrics["train"]["mixup_loss"][-1], rel=1e-6)
    calls = []
    ours.model.model.register_forward_hook(lambda *a: calls.append(1))
    ours.train()
    mix = [h["mixup_loss"] for h in ours.state.log_history if "mixup_loss" in h]
    assert calls == [1, 1] and len(mix) == 2 and all(torch.isfinite(torch.tensor(mix)))


def test_the_guard_alone_stops_a_plain_trainer_on_an_infinite_gradient(tok, tmp_path):
    """NonFiniteGuard on transformers.Trainer (no SFTMix): an infinite gradient at step 2 stops training before that
    update, with the one-line message; the weights are those after step 1."""
    from sftmix.mixup.guard import NonFiniteGuard

    class GuardedTrainer(NonFiniteGuard, Trainer):
        pass

    class Snapshot(TrainerCallback):
        weights = None

        def on_step_end(self, args, state, control, model=None, **kw):
            self.weights = [p.detach().clone() for p in model.parameters()]

    ds = rows(tok).remove_columns(["guid", "confidence", "n_response_tokens"])
    tr = GuardedTrainer(model=build_tiny_model(tok), processing_class=tok, train_dataset=ds,
                        args=TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                               **COMMON),
                        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    snap = Snapshot()
    tr.add_callback(snap)
    tr.model.lm_head.weight.register_hook(lambda g: g * float("inf") if tr.state.global_step == 1 else g)
    with pytest.raises(SFTMixError, match=r"non-finite gradient at step 2 \(gradient norm (nan|inf)") as e:
        tr.train()
    assert "\n" not in str(e.value) and tr.state.global_step == 1
    for p, q in zip(tr.model.parameters(), snap.weights):
        assert torch.equal(p.detach(), q)


def test_one_run_sftmix_is_given_its_callback_explicitly(tok, tmp_path):
    """self_reference_epochs > 0: the SelfReferenceCallback given as `self_reference=` is added first among the
    trainer's callbacks and bound to it (its `trainer`) in __init__; without it the trainer refuses to be built (not at
    the switch, an epoch later), also when a callback with a `self_split` method (or the callback itself) is among
    `callbacks`: nothing is found by duck typing."""
    from sftmix import SFTMixConfig, SFTMixTrainer
    from sftmix.confidence.callback import SelfReferenceCallback

    ds = rows(tok)
    args = SFTMixConfig(output_dir=str(tmp_path / "sftmix"), per_device_train_batch_size=4, num_train_epochs=2,
                        self_reference_epochs=1, record_online_dynamics=True, max_length=None,
                        **{**COMMON, "learning_rate": 3e-3})
    cb = SelfReferenceCallback(ds, tmp_path, confidence="online")
    other = TrainerCallback()
    tr = SFTMixTrainer(model=build_tiny_model(tok), args=args, train_dataset=ds, processing_class=tok,
                       self_reference=cb, callbacks=[other])
    assert tr.self_reference is cb and cb.trainer is tr
    mine = [c for c in tr.callback_handler.callbacks if c in (cb, other)]
    assert mine == [cb, other]

    class LooksLikeOne(TrainerCallback):
        def self_split(self, guids, write=True):
            raise AssertionError("not a SelfReferenceCallback")

    for callbacks in ([], [LooksLikeOne()], [SelfReferenceCallback(ds, tmp_path / "x", confidence="online")]):
        with pytest.raises(SFTMixError, match=r"self_reference_epochs=1 \(one-run SFTMix\) .* self_reference="):
            SFTMixTrainer(model=build_tiny_model(tok), args=args, train_dataset=ds, processing_class=tok,
                          callbacks=callbacks)


def test_a_subclass_written_for_the_two_calls_still_prepares_its_rows_once(tok, tmp_path):
    """Code that calls prepare_train_dataset before the Trainer's __init__ and setup_sftmix() after it (the earlier
    way) gets the rows prepared once: with ntp_subset=confident and Mixup off a second preparation would halve the
    confident half again (8 -> 4 of 16 rows); and the set-up runs once (one collator wrapper)."""
    from sftmix.mixup.hf import SFTMixTrainingArguments
    from sftmix.mixup.mixin import SFTMixMixin
    from sftmix.mixup.sampling import SFTMixCollator, prepare_train_dataset

    class TwoCalls(SFTMixMixin, Trainer):
        def __init__(self, *a, args=None, train_dataset=None, **kw):
            train_dataset, _ = prepare_train_dataset(train_dataset, args)
            super().__init__(*a, args=args, train_dataset=train_dataset, **kw)
            self.setup_sftmix()

    args = SFTMixTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                                   mixup_weight=0.0, ntp_subset="confident", **COMMON)
    tr = TwoCalls(model=build_tiny_model(tok), args=args, train_dataset=rows(tok), processing_class=tok,
                  data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    assert len(tr.train_dataset) == 8
    assert isinstance(tr.data_collator, SFTMixCollator) and not isinstance(tr.data_collator.base, SFTMixCollator)


def test_the_capture_survives_accelerates_mixed_precision_wrapping_and_unwrapping(tok):
    """The wrapped forward states the model's signature (the Trainer keeps the dataset columns it names), and it still
    captures after accelerate's bf16 autocast wrapper is put around it (prepare) and taken off again
    (unwrap_model(keep_fp32_wrapper=False), as a save does)."""
    import inspect

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sftmix.mixup.capture import StepCapture, capture_loss_forward

    model = build_tiny_model(tok)
    own = list(inspect.signature(model.forward).parameters)
    captured = StepCapture(want_hidden=True)
    capture_loss_forward(model, lambda: captured, lambda kw: True, lambda *pending: None)
    assert list(inspect.signature(model.forward).parameters) == own and own[0] == "input_ids"
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state other tests' Trainers set up
    try:
        acc = Accelerator(mixed_precision="bf16", cpu=True)
        for wrapped in (acc.prepare(model), None):
            if wrapped is None:
                wrapped = acc.unwrap_model(model, keep_fp32_wrapper=False)
            captured.outputs = captured.hidden = None
            wrapped(input_ids=torch.tensor([[1, 2, 3]]))  # under prepare, accelerate returns fp32 copies of the outputs
            assert captured.outputs is not None and captured.hidden.shape == (1, 3, model.config.hidden_size)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
