"""SFTMix: Mixup-regularized instruction tuning (Xiao et al., arXiv 2410.05248) on top of TRL.

    from sftmix import SFTMixConfig, SFTMixTrainer
    trainer = SFTMixTrainer(model=model, args=SFTMixConfig(output_dir="out"), train_dataset=ds)  # ds has `confident`
    trainer.train()

Imports are lazy so that `sftmix --help` and the pure tensor math do not pay for importing TRL.
"""

__version__ = "0.1.0"

_LAZY = {
    "SFTMixConfig": "sftmix.mixup.trainer",
    "SFTMixTrainer": "sftmix.mixup.trainer",
    "SFTMixHFTrainer": "sftmix.mixup.hf",
    "SFTMixTrainingArguments": "sftmix.mixup.hf",
    "SFTMixMixin": "sftmix.mixup.mixin",
    "mixup_loss": "sftmix.mixup.loss",
    "SFTMixError": "sftmix.utils",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sftmix' has no attribute {name!r}")
