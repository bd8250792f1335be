"""The axolotl plugin's settings, checked without importing axolotl (so sftmix's own tests run the same checks).

    from sftmix.integrations.axolotl_checks import check_plugin_config
    check_plugin_config(cfg)   # axolotl's config (a mapping or its pydantic model); SFTMixError naming the YAML key

Called by the plugin's pydantic validator, i.e. when axolotl validates the YAML (`axolotl train`, `axolotl
preprocess`, `load_cfg`), before any dataset is read or tokenized; and again by the plugin's earliest hook that sees
the config (`load_datasets`, `get_trainer_cls`), for configs built without that validation. The Mixup values go
through `MixupArguments.validate_mixup_args`, the core's own checks, with the YAML's `sftmix_` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from sftmix.mixup.args import MIXUP_ROLES, NTP_SUBSETS, WEIGHT_SCHEDULES, MixupArguments
from sftmix.utils import SFTMixError

# The MixupArguments fields a YAML sets as `sftmix_<name>` (with their pydantic types; defaults and help come from
# MixupArguments).
YAML_FIELDS = {
    "mixup_alpha": float,
    "mixup_weight": float,
    "mixup_role": Literal[MIXUP_ROLES],
    "ntp_subset": Literal[NTP_SUBSETS],
    "mixup_weight_schedule": Literal[WEIGHT_SCHEDULES],
    "mixup_chunk_tokens": int | None,
}


def mixup_arguments(cfg) -> MixupArguments:
    """The MixupArguments of an axolotl config's `sftmix_*` keys (MixupArguments' default where a key is unset)."""
    get = _getter(cfg)
    defaults = MixupArguments()
    return MixupArguments(**{name: _or(get(f"sftmix_{name}"), getattr(defaults, name)) for name in YAML_FIELDS})


def check_plugin_config(cfg) -> None:
    """Refuse, in one line naming the YAML key, an axolotl config the SFTMix plugin cannot train."""
    get = _getter(cfg)
    args = mixup_arguments(cfg)
    args.validate_mixup_args(prefix="sftmix_")
    if get("rl") or get("reward_model") or get("process_reward_model"):
        raise SFTMixError("the SFTMix plugin trains supervised fine-tuning (SFT) only; remove it from `plugins` "
                          "for rl / reward_model runs.")
    if get("sample_packing"):
        raise SFTMixError("sample_packing is not supported by SFTMix: Mixup pairs whole examples (row c with row u "
                          "of a batch), which packing mixes into shared rows. Set sample_packing: false.")
    if (args.mixup_enabled or args.ntp_subset != "all") and not get("sftmix_confidence_file"):
        raise SFTMixError("sftmix_confidence_file is required: run step 1 (`sftmix dynamics --config "
                          "examples/axolotl/step1.yaml --output_dir DIR`, see docs/integrations.md) and set it to "
                          "DIR/confidence.jsonl (or set sftmix_mixup_weight: 0).")
    mbs = get("micro_batch_size")
    if args.mixup_enabled and isinstance(mbs, int) and mbs % 2:
        raise SFTMixError(f"micro_batch_size: {mbs} is odd: SFTMix batches hold equally many confident and "
                          f"unconfident rows; use an even micro_batch_size (e.g. {mbs + 1}), with "
                          f"gradient_accumulation_steps for the global batch.")


def _getter(cfg):
    if isinstance(cfg, Mapping):  # axolotl's DictDefault, a plain dict
        return cfg.get
    return lambda key: getattr(cfg, key, None)  # the pydantic model, inside its validator


def _or(value, default):
    return default if value is None else value
