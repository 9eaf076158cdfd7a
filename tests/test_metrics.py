"""Task metrics against hand-worked examples and reference implementations."""

from __future__ import annotations

import json

import pytest

from automodel.errors import UsageError
from automodel.eval.metrics import (
    anls,
    bleu4,
    cider_d,
    compute_metrics,
    cord_metrics,
    exact_match,
    expand_metric_names,
    nted_accuracy,
    parse_prediction,
    score_names,
)

REF = {
    "menu": [
        {"nm": "Tea", "cnt": "1", "price": "9,000"},
        {"nm": "Latte", "cnt": "2", "price": "36,000"},
    ],
    "total": {"total_price": "45,000"},
}


def _json(obj) -> str:
    return json.dumps(obj)


def test_cord_perfect_prediction_scores_one():
    result = cord_metrics([_json(REF)], [[_json(REF)]])
    assert result.scores == {
        "field_f1": 1.0,
        "field_precision": 1.0,
        "field_recall": 1.0,
        "nted_accuracy": 1.0,
        "json_valid": 1.0,
    }


def test_cord_fields_match_as_multisets_but_tree_accuracy_sees_order():
    swapped = {**REF, "menu": [REF["menu"][1], REF["menu"][0]]}
    result = cord_metrics([_json(swapped)], [[_json(REF)]])
    assert result.scores["field_f1"] == 1.0
    assert result.scores["nted_accuracy"] < 1.0


def test_cord_partial_prediction_counts_fields_over_the_corpus():
    # 7 reference fields. Prediction: 3 right (Tea, 1, 9,000), 1 wrong (total), 0 for Latte.
    pred = {"menu": [{"nm": "Tea", "cnt": "1", "price": "9,000"}], "total": {"total_price": "1"}}
    result = cord_metrics([_json(pred), "not json", _json(REF)], [[_json(REF)]] * 3)
    # Corpus: predicted 4 + 0 + 7 = 11 fields, reference 21, hits 3 + 0 + 7 = 10.
    assert result.scores["field_precision"] == pytest.approx(10 / 11)
    assert result.scores["field_recall"] == pytest.approx(10 / 21)
    assert result.scores["field_f1"] == pytest.approx(2 * 10 / (11 + 21))
    assert result.scores["json_valid"] == pytest.approx(2 / 3)
    assert result.per_sample[1] == {"json_valid": 0.0, "field_f1": 0.0, "nted_accuracy": 0.0}


def test_nted_accuracy_worked_example():
    # Normalised trees: root -> a -> <leaf>abc. From the empty tree: insert "a" (1) and the
    # leaf (its length, 3) = 4. "abd" needs one relabel of cost Levenshtein("abd", "abc") = 1.
    assert nted_accuracy({"a": "abd"}, {"a": "abc"}) == pytest.approx(1 - 1 / 4)
    assert nted_accuracy({}, {"a": "abc"}) == 0.0
    # Key order never counts (Donut sorts keys); an extra key costs its subtree: 1 + len("zz").
    assert nted_accuracy({"b": "x", "a": "abc"}, {"a": "abc", "b": "x"}) == 1.0
    assert nted_accuracy({"a": "abc", "c": "zz"}, {"a": "abc"}) == pytest.approx(1 - 3 / 4)


def test_donut_tokens_parse_like_json():
    tokens = "<s_menu><s_nm>Latte</s_nm><s_cnt>2</s_cnt><sep/><s_nm>Tea</s_nm></s_menu>"
    assert parse_prediction(tokens) == {"menu": [{"nm": "Latte", "cnt": "2"}, {"nm": "Tea"}]}
    assert parse_prediction("plain text") is None
    assert parse_prediction('["a list"]') is None


def test_cord_rejects_a_reference_that_is_not_structured():
    with pytest.raises(UsageError, match="exact_match"):
        cord_metrics(["x"], [["just text"]])


def test_exact_match_normalises_case_punctuation_and_articles():
    result = exact_match(["The Cat!", "a  dog", "cow"], [["cat"], ["hound", "Dog."], ["horse"]])
    assert [s["exact_match"] for s in result.per_sample] == [1.0, 1.0, 0.0]
    assert result.scores["exact_match"] == pytest.approx(2 / 3)


def test_anls_thresholds_the_normalised_distance():
    result = anls(["helo", "dgo", "Total"], [["hello"], ["dog"], ["x", "total"]])
    # 1 edit in 5 -> 0.8; 2 edits in 3 (>= 0.5) -> 0; case is ignored -> 1.
    assert [s["anls"] for s in result.per_sample] == pytest.approx([0.8, 0.0, 1.0])


def test_bleu4_is_sacrebleus_corpus_score_with_uneven_reference_counts():
    import sacrebleu

    preds = ["a cat sits on the mat", "the dog runs in the park today"]
    refs = [["a cat sits on the mat", "the cat sat"], ["a dog runs in a park today"]]
    expected = sacrebleu.corpus_bleu(preds, [[refs[0][0], refs[1][0]], [refs[0][1], refs[1][0]]])
    assert bleu4(preds, refs).scores["bleu4"] == pytest.approx(expected.score)
    assert bleu4(preds[:1], refs[:1]).scores["bleu4"] == pytest.approx(100.0)


def test_cider_d_worked_example():
    # Two samples, so idf = log 2 - log df. "a" occurs in both references: idf 0. For sample 1
    # the 1- and 2-gram vectors equal the reference's (cosine 1), there are no 3- or 4-grams
    # (0), equal lengths (no penalty): 10 * (1 + 1 + 0 + 0) / 4 = 5. Sample 2 shares only "a",
    # whose weight is 0: 0. The corpus score is the mean, 2.5.
    result = cider_d(["a cat", "a cat"], [["a cat"], ["a dog"]])
    assert [s["cider"] for s in result.per_sample] == pytest.approx([5.0, 0.0])
    assert result.scores["cider"] == pytest.approx(2.5)


def test_cider_d_matches_the_coco_caption_toolkit():
    # Reference values from pycocoevalcap 1.2's CiderScorer (n=4, sigma=6) on these strings.
    preds = ["a man rides a red bike", "two dogs play in the snow", "a plate of food"]
    refs = [
        ["a man riding a red bicycle", "a person on a bike"],
        ["dogs playing in snow", "two dogs run through the snow"],
        ["a plate with food on it", "food on a white plate", "a meal"],
    ]
    result = cider_d(preds, refs)
    assert result.scores["cider"] == pytest.approx(COCO_CIDER, abs=1e-9)
    assert [s["cider"] for s in result.per_sample] == pytest.approx(COCO_PER_SAMPLE, abs=1e-9)


COCO_CIDER = 1.6904693438520784
COCO_PER_SAMPLE = [1.7454981617528176, 2.0574327133882533, 1.2684771564151647]


def test_metric_names_expand_groups_and_reject_unknown_names():
    assert expand_metric_names("vqa") == ["exact_match", "anls"]
    assert expand_metric_names(["caption", "bleu4"]) == ["bleu4", "cider"]
    assert score_names("cord")[0] == "field_f1"
    with pytest.raises(UsageError, match="unknown metric 'bleu'.*known"):
        expand_metric_names(["bleu"])


def test_compute_metrics_merges_scores_and_per_sample_rows():
    result = compute_metrics(["vqa", "bleu4"], ["cat", "dog"], [["cat"], ["cow"]])
    assert set(result.scores) == {"exact_match", "anls", "bleu4"}
    assert set(result.per_sample[0]) == {"exact_match", "anls", "bleu4"}
