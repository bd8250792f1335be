"""sftmix.confidence.split, pure functions of plain arrays and columns: the median split without guids, the flags of a
training dataset from the column its settings name, the threshold the reports draw, and the rules of one-run SFTMix.
(confidence, variability and split_confident's ties by guid: tests/test_dynamics.py; selection and nearest pairing:
tests/test_analyses.py.)"""

from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset

from sftmix.confidence.split import confident_flags, median_split, one_run_problem, split_threshold
from sftmix.utils import SFTMixError


def test_median_split_without_guids_breaks_ties_by_row_and_puts_the_median_low():
    assert median_split([2.0, 1.0, 1.0, 0.0]).tolist() == [True, True, False, False]  # the earlier of the tied rows
    assert median_split([0.0, 1.0, 1.0, 2.0]).tolist() == [False, True, False, True]
    assert median_split([1.0, 3.0, 2.0]).tolist() == [False, True, False]  # odd N: floor(N/2), the median low
    assert median_split([1.0, 1.0, 0.0], guids=["z", "a", "m"]).tolist() == [False, True, False]  # guids decide
    with pytest.raises(SFTMixError, match="all 4 examples have the same confidence"):
        median_split([0.5] * 4)


def args(**kw):
    return SimpleNamespace(**{"split_source": "dynamics", "split_column": None, "split_confident_values": None, **kw})


def test_confident_flags_come_from_the_column_the_settings_name():
    ds = Dataset.from_dict({"guid": ["a", "b", "c", "d"], "confident": [True, False, False, True],
                            "confidence": [0.1, 0.9, 0.4, 0.2], "label": ["good", "bad", "good", "meh"],
                            "score": [3.0, 1.0, 2.0, 0.0], "flag": [False, True, True, False]})
    assert confident_flags(ds, args()).tolist() == [True, False, False, True]  # `confident` first
    assert confident_flags(ds.remove_columns("confident"), args()).tolist() == [False, True, True, False]  # median
    col = args(split_source="column", split_column="score")
    assert confident_flags(ds, col).tolist() == [True, False, True, False]
    assert confident_flags(ds, args(split_source="column", split_column="flag")).tolist() == [False, True, True, False]
    good = args(split_source="column", split_column="label", split_confident_values=["good"])
    assert confident_flags(ds, good).tolist() == [True, False, True, False]
    with pytest.raises(SFTMixError, match=r"split_column 'label' holds labels \(\['bad', 'good', 'meh'\].*set "
                                          r"split_confident_values"):
        confident_flags(ds, args(split_source="column", split_column="label"))
    with pytest.raises(SFTMixError, match="split_column 'nope' is not a column"):
        confident_flags(ds, args(split_source="column", split_column="nope"))
    with pytest.raises(SFTMixError, match="neither a boolean `confident` column nor a float `confidence` column"):
        confident_flags(ds.remove_columns(["confident", "confidence"]), args())


def test_split_threshold_lies_between_the_halves():
    conf = np.array([-1.0, -5.0, -2.0, -4.0])
    assert split_threshold(conf, [True, False, True, False]) == -3.0
    assert split_threshold(conf, [False] * 4) == -3.0  # one half empty: the median


@pytest.mark.parametrize("kw, words", [
    (dict(ntp_epochs=0), "needs a whole self_reference_epochs >= 1"),
    (dict(ntp_epochs=1.5), "needs a whole self_reference_epochs >= 1"),
    (dict(ntp_epochs=True), "needs a whole self_reference_epochs >= 1"),
    (dict(ntp_epochs=1, mixup_enabled=False), "mixup_weight=0 turns Mixup off"),
    (dict(ntp_epochs=1, pairing="nearest"), "needs pairing=random"),
    (dict(ntp_epochs=1, split_source="column"), "split_source=column does not apply"),
    (dict(ntp_epochs=1, ntp_subset="confident"), "needs ntp_subset=all"),
    (dict(ntp_epochs=1, num_train_epochs=3, max_steps=10), "unset max_steps (got max_steps=10)"),
    (dict(ntp_epochs=1, num_train_epochs=2.5), "needs a whole num_train_epochs"),
    (dict(ntp_epochs=2, num_train_epochs=2), "needs num_train_epochs greater than self_reference_epochs=2"),
])
def test_one_run_rules_each_name_the_setting_to_change(kw, words):
    problem = one_run_problem(kw.pop("ntp_epochs"), **kw)
    assert words in problem and "\n" not in problem


def test_one_run_settings_that_can_run_have_no_problem_in_the_users_names():
    assert one_run_problem(1) is None  # num_train_epochs unknown yet: the epoch rules wait
    assert one_run_problem(2, num_train_epochs=3, max_steps=-1) is None
    worded = one_run_problem(0, epochs_name="self_ntp_epochs", what="reference=self")
    assert worded.startswith("reference=self needs a whole self_ntp_epochs >= 1")
