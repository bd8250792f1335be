"""Shared test fixtures: tiny offline datasets for the tiny random model (no downloads)."""

import random

from datasets import Dataset

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
