"""Shared test helpers: tiny offline datasets for the tiny random model (no downloads), independent reference
computations the package is checked against, and spies on a trainer."""

import random

import torch

WORDS_Q = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird"]
WORDS_A = ["red", "blue", "green", "small", "large", "quick"]


def tiny_records(n=32, seed=0, with_confidence=True):
    """Prompt/completion records (conversational) of varied prompt and response lengths."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS_Q) for _ in range(rng.randint(1, 8)))
        a = " ".join(rng.choice(WORDS_A) for _ in range(rng.randint(1, 10)))
        row = {
            "guid": f"g{i:04d}",
            "prompt": [{"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": a}],
        }
        if with_confidence:
            row["confidence"] = rng.random()
        rows.append(row)
    return rows


def tiny_dataset(n=32, seed=0, with_confidence=True):
    from datasets import Dataset  # here: benchmarks/gpu_check.py imports this module where datasets may be missing

    return Dataset.from_list(tiny_records(n, seed, with_confidence))


class Interrupt(Exception):
    """Raised by `interrupt_at(step)`: a run cut off mid-training, to test resuming."""


def interrupt_at(step):
    """A TrainerCallback that stops training by raising Interrupt at the end of optimizer step `step`."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise Interrupt

    return Stop()


def naive_mixup_loss(hidden_states, labels, lm_head_weight, pairs, lam) -> torch.Tensor:
    """The Mixup loss written the obvious way, independently of sftmix.mixup.loss: full-vocabulary logits, one pair at a
    time."""
    losses = []
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    for (c, u), lam_p in zip(pairs.tolist(), lam.reshape(-1)):
        pos_c = (labels[c, 1:] != -100).nonzero().flatten()
        pos_u = (labels[u, 1:] != -100).nonzero().flatten()
        length = min(len(pos_c), len(pos_u))
        if length == 0:
            continue
        pos_c, pos_u = pos_c[:length], pos_u[:length]
        z = lam_p * hidden_states[c, pos_c].to(dtype) + (1 - lam_p) * hidden_states[u, pos_u].to(dtype)
        logp = torch.log_softmax(z @ lm_head_weight.to(dtype).t(), dim=-1)
        nll_c = -logp.gather(1, labels[c, pos_c + 1][:, None]).squeeze(1)
        nll_u = -logp.gather(1, labels[u, pos_u + 1][:, None]).squeeze(1)
        losses.append((lam_p * nll_c + (1 - lam_p) * nll_u).mean())
    return torch.stack(losses).mean()


def capture_pairs(trainer) -> list:
    """Spy on an SFTMix trainer's Mixup term: returns a list that gets (pairs, lam) of every term it computes (CPU
    tensors), what a test recomputes independently."""
    seen = []
    real = trainer._mixup_term

    def spy(pairs, lam, labels):
        seen.append((pairs.detach().cpu(), lam.detach().cpu()))
        return real(pairs, lam, labels)

    trainer._mixup_term = spy
    return seen


def model_summary(model) -> dict:
    """Facts about a loaded causal LM that the report and the Mixup loss care about."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    first = next(model.parameters())
    return {
        "model_type": getattr(config, "model_type", None),
        "n_params": sum(p.numel() for p in model.parameters()),  # parameters() yields a tied weight once
        "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "vocab": int(head.weight.shape[0]) if head is not None else getattr(config, "vocab_size", None),
        "hidden": getattr(config, "hidden_size", None),
        "layers": getattr(config, "num_hidden_layers", None),
        "tied_embeddings": head is not None and emb is not None and head.weight is emb.weight,
        "lm_head_bias": head is not None and getattr(head, "bias", None) is not None,
        # softcapping changes the logits after the head: the Mixup loss must apply it too
        "final_logit_softcapping": getattr(config, "final_logit_softcapping", None),
    }


def sigkill_script(run: str, step: int) -> str:
    """`python -c` source of `sftmix ARGS` that SIGKILLs itself at the end of optimizer step `step` of the training
    run whose output folder is named `run` (e.g. "sftmix"): a kill -9 in the middle of a real pipeline run."""
    return f"""
import os, signal, sys
from transformers import TrainerCallback
import sftmix.mixup.trainer as T

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if os.path.basename(args.output_dir) == {run!r} and state.global_step == {int(step)}:
            os.kill(os.getpid(), signal.SIGKILL)

init = T.SFTMixTrainer.__init__
def patched(self, *a, **kw):
    init(self, *a, **kw)
    self.add_callback(Kill())
T.SFTMixTrainer.__init__ = patched
from sftmix.cli import main
main(sys.argv[1:])
"""
