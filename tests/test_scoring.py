"""sftmix.confidence.scoring, the scorer of step 1: the LM head read in vocabulary tiles gives the full-logits NLL,
batches are padded by torch's pad_sequence on either side, and the columns a scored dataset needs are named.
(Scoring against full logits, padding invariance, bucketing and the head's transforms: tests/test_dynamics.py; the
shares of several processes: tests/test_distributed.py.)"""

import pytest
import torch
from helpers import tiny_records

from sftmix.confidence import scoring
from sftmix.confidence.scoring import check_score_columns, score_examples
from sftmix.data import tokenize_records
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError


def full_logits_nll(model, row) -> float:
    """Independent computation: one example, no padding, the whole [T, V] logits in float64, log_softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([row["input_ids"]])).logits[0].double()
    targets = torch.tensor(row["labels"])[1:]
    mask = targets != -100
    return -torch.log_softmax(logits[:-1], -1)[mask].gather(-1, targets[mask][:, None]).mean().item()


@pytest.mark.parametrize("chunk", [7, 64, 8192])
def test_vocabulary_tiles_give_the_full_logits_nll(monkeypatch, chunk):
    """The 260-token vocabulary in tiles of 7 (38 tiles, the last one short), 64 and 8192 (one tile): the same NLL as
    the full logits, so the tiling (the reason [B, T, V] never exists) loses nothing at a tile's edge."""
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0).eval()
    ds, _ = tokenize_records(tiny_records(9, seed=2, with_confidence=False), tok)
    monkeypatch.setattr(scoring, "LOGPROB_VOCAB_CHUNK", chunk)
    rows = score_examples(model, ds, batch_size=4, show_progress=False)
    assert len(tok) == 260 and [r["guid"] for r in rows] == list(ds["guid"])
    for r, ex in zip(rows, ds):
        assert r["nll_mean"] == pytest.approx(full_logits_nll(model, ex), abs=1e-5)


def test_a_batch_is_padded_on_either_side_with_the_pad_id_ignore_index_and_a_zero_mask():
    ids, labels = [[5, 6, 7], [8]], [[-100, 6, 7], [8]]
    got = scoring._pad_batch(ids, labels, pad_id=0, padding_side="right", guid_of=str)
    assert [t.tolist() for t in got] == [[[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]],
                                         [[1, 1, 1], [1, 0, 0]]]
    got = scoring._pad_batch(ids, labels, pad_id=3, padding_side="left", guid_of=str)
    assert [t.tolist() for t in got] == [[[5, 6, 7], [3, 3, 8]], [[-100, 6, 7], [-100, -100, 8]],
                                         [[1, 1, 1], [0, 0, 1]]]
    assert all(t.dtype == torch.long for t in got)
    with pytest.raises(SFTMixError, match=r"example 'row1': input_ids \(1\) and labels \(2\) differ in length"):
        scoring._pad_batch(ids, [[-100, 6, 7], [8, 9]], pad_id=0, padding_side="right", guid_of=lambda r: f"row{r}")


def test_a_dataset_without_the_scored_columns_is_named_in_one_line():
    with pytest.raises(SFTMixError, match=r"the data map has no labels, guid column\(s\) \(it has \['input_ids'\]\)"):
        check_score_columns([{"input_ids": [1, 2]}], "the data map")
    check_score_columns([{"input_ids": [1], "labels": [1], "guid": "a"}])  # all three: nothing to say
