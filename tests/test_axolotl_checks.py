"""The axolotl plugin's config checks (sftmix.integrations.axolotl_checks), in sftmix's own environment: they import
no axolotl, and the plugin's pydantic validator runs the same function when axolotl validates the YAML
(tests/integrations/test_axolotl.py::test_bad_yaml_values_are_refused runs it there)."""

import math

import pytest

from sftmix.core import MixupArguments
from sftmix.integrations.axolotl_checks import check_plugin_config, mixup_arguments
from sftmix.utils import SFTMixError

GOOD = {"sftmix_confidence_file": "runs/ref/confidence.jsonl", "sftmix_mixup_alpha": 0.5, "sftmix_mixup_weight": 0.2,
        "sample_packing": False, "micro_batch_size": 8}


@pytest.mark.parametrize("bad, match", [
    ({"sftmix_mixup_alpha": math.nan}, r"sftmix_mixup_alpha must be a finite number > 0.*got nan"),
    ({"sftmix_mixup_alpha": math.inf}, r"sftmix_mixup_alpha must be a finite number > 0.*got inf"),
    ({"sftmix_mixup_alpha": 0.0}, r"sftmix_mixup_alpha must be a finite number > 0"),
    ({"sftmix_mixup_weight": math.nan}, r"sftmix_mixup_weight must be a finite number >= 0.*got nan"),
    ({"sftmix_mixup_weight": -math.inf}, r"sftmix_mixup_weight must be a finite number >= 0"),
    ({"sftmix_mixup_chunk_tokens": 0}, r"sftmix_mixup_chunk_tokens must be a whole number >= 1.*got 0"),
    ({"sftmix_mixup_chunk_tokens": -4}, r"sftmix_mixup_chunk_tokens must be a whole number >= 1"),
    ({"sftmix_mixup_role": "sometimes"}, r"sftmix_mixup_role='sometimes' is not one of"),
    ({"sample_packing": True}, r"sample_packing is not supported by SFTMix.*sample_packing: false"),
    ({"rl": "dpo"}, r"supervised fine-tuning \(SFT\) only"),
    ({"micro_batch_size": 3}, r"micro_batch_size: 3 is odd.*e\.g\. 4"),
    ({"sftmix_confidence_file": None}, r"sftmix_confidence_file is required"),
])
def test_plugin_config_refuses_what_the_core_refuses_in_one_line_with_the_yaml_key(bad, match):
    with pytest.raises(SFTMixError, match=match) as e:
        check_plugin_config({**GOOD, **bad})
    assert "\n" not in str(e.value)


def test_plugin_config_accepts_the_paper_settings_and_mixup_off():
    check_plugin_config(GOOD)
    check_plugin_config({"sftmix_mixup_weight": 0.0, "micro_batch_size": 3})  # plain NTP: no file, any batch
    args = mixup_arguments({"sftmix_mixup_weight": 0.3, "sftmix_mixup_chunk_tokens": None})
    assert (args.mixup_weight, args.mixup_alpha, args.mixup_chunk_tokens) == (0.3, 0.5, None)  # defaults filled in


def test_mixup_arguments_refuse_non_finite_values_and_a_zero_chunk():
    """The core's own check (every trainer's arguments): NaN passed `mixup_alpha <= 0` before."""
    for kw in ({"mixup_alpha": math.nan}, {"mixup_alpha": math.inf}, {"mixup_weight": math.nan},
               {"mixup_weight": math.inf}, {"mixup_chunk_tokens": 0}):
        with pytest.raises(SFTMixError, match=f"^{next(iter(kw))} must be"):
            MixupArguments(**kw).validate_mixup_args()
    MixupArguments(mixup_chunk_tokens=4096).validate_mixup_args()

