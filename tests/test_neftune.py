"""NEFTune (`neftune_noise_alpha`, a transformers TrainingArguments field) with both SFTMix trainers: the noise is in
the training forward that the Mixup term reads its hidden states from, never in evaluation, and with mixup_weight=0
SFTMixTrainer + NEFTune is trl.SFTTrainer + NEFTune step by step."""

import numpy as np
import pytest
import torch
from helpers import tiny_dataset
from transformers import DataCollatorForSeq2Seq, TrainerCallback
from trl import SFTConfig, SFTTrainer

from sftmix import SFTMixConfig, SFTMixTrainer
from sftmix.data import tokenize_records
from sftmix.mixup.hf import SFTMixHFTrainer, SFTMixTrainingArguments
from sftmix.models import build_byte_tokenizer, build_tiny_model

COMMON = dict(report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-3, bf16=False, seed=0,
              dataloader_num_workers=0, disable_tqdm=True, per_device_train_batch_size=4, max_steps=2)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def make(cls, tok, tmp_path, **kw):
    if cls is SFTMixHFTrainer:  # transformers.Trainer + the component: tokenized rows, the model's own loss
        from helpers import tiny_records

        ds, _ = tokenize_records(tiny_records(16), tok)
        args = SFTMixTrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                       **{k: v for k, v in {**COMMON, **kw}.items() if k != "gradient_checkpointing"})
        return cls(model=build_tiny_model(tok, seed=0), args=args, train_dataset=ds, eval_dataset=ds,
                   processing_class=tok, data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    cfg = (SFTMixConfig if cls is SFTMixTrainer else SFTConfig)(output_dir=str(tmp_path), gradient_checkpointing=False,
                                                                **{**COMMON, **kw})
    ds = tiny_dataset(16)
    return cls(model=build_tiny_model(tok, seed=0), args=cfg, processing_class=tok, train_dataset=ds,
               eval_dataset=ds.remove_columns("confidence") if cls is SFTTrainer else ds)


def neftune_hooks(module) -> int:
    return sum("neftune" in getattr(h, "__name__", "") for h in module._forward_hooks.values())


class EmbeddingNoise(TrainerCallback):
    """From on_train_begin (after the Trainer put NEFTune's hook on the input embeddings): for every embedding
    forward, whether the module was in training mode and how far its output is from the plain table lookup."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_train_begin(self, args, state, control, **kw):
        emb = self.trainer.model.get_input_embeddings()
        self.hooks_in_training = neftune_hooks(emb)

        def hook(module, inputs, output):
            plain = torch.nn.functional.embedding(inputs[0], module.weight)
            self.seen.append((module.training, (output - plain).abs().max().item()))

        emb.register_forward_hook(hook)


@pytest.mark.parametrize("cls", [SFTMixTrainer, SFTMixHFTrainer])
def test_neftune_noise_is_in_training_and_in_the_mixup_states_never_in_evaluation(cls, tok, tmp_path):
    for alpha in (None, 5.0):
        tr = make(cls, tok, tmp_path / str(alpha), neftune_noise_alpha=alpha, eval_strategy="steps", eval_steps=1)
        spy = EmbeddingNoise(tr)
        tr.add_callback(spy)
        mixed = []  # the hidden states the Mixup term reads, against the same batch's noise-free forward
        real = tr._mixup_term
        backbone = tr._causal_lm.base_model
        batch_inputs = {}
        backbone.register_forward_pre_hook(lambda m, a, kw: batch_inputs.update(kw), with_kwargs=True)

        def spy_mixup(pairs, lam, labels, real=real, backbone=backbone, batch_inputs=batch_inputs, mixed=mixed):
            captured = tr._captured.hidden.detach().clone()
            was = backbone.training
            backbone.eval()  # NEFTune adds noise in training mode only (dropout is 0 in the tiny model)
            with torch.no_grad():
                clean = backbone(input_ids=batch_inputs["input_ids"],
                                 attention_mask=batch_inputs.get("attention_mask")).last_hidden_state
            backbone.train(was)
            mixed.append((captured - clean).abs().max().item())
            return real(pairs, lam, labels)

        tr._mixup_term = spy_mixup
        tr.train()
        train_dev = [d for training, d in spy.seen if training]
        eval_dev = [d for training, d in spy.seen if not training]
        assert train_dev and eval_dev and len(mixed) == 2  # both steps, and the evaluations after each
        assert max(eval_dev) == 0.0  # evaluation: never noisy
        if alpha is None:
            assert max(train_dev) == 0.0 and max(mixed) < 1e-5
        else:
            assert min(train_dev) > 0.0  # every training forward is noisy ...
            assert min(mixed) > 1e-3  # ... and so are the hidden states that Mixup interpolates
        assert spy.hooks_in_training == (alpha is not None)  # transformers' own NEFTune hook, in training ...
        assert neftune_hooks(tr.model.get_input_embeddings()) == 0  # ... and removed after it


def test_mixup_weight_zero_with_neftune_is_sfttrainer_with_neftune_step_by_step(tok, tmp_path):
    kw = dict(neftune_noise_alpha=5.0, max_steps=4, gradient_accumulation_steps=2)
    ours = make(SFTMixTrainer, tok, tmp_path / "a", mixup_weight=0.0, **kw)
    ours.train()
    ref = make(SFTTrainer, tok, tmp_path / "b", **kw)
    ref.train()
    plain = make(SFTTrainer, tok, tmp_path / "c", **{**kw, "neftune_noise_alpha": None})
    plain.train()

    def losses(t):
        return [h["loss"] for h in t.state.log_history if "loss" in h and "train_runtime" not in h]

    assert len(losses(ours)) == 4
    np.testing.assert_allclose(losses(ours), losses(ref), rtol=1e-6)
    assert not np.allclose(losses(ref), losses(plain), rtol=1e-4)  # the noise changed training: the check can fail
    for p, q in zip(ours.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q)
