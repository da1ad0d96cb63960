"""Scoring both ways: this project's strict answer matching and the original LiME code's lenient one
(`answers_match(..., scoring="original")`), STS-B both ways, and the two aggregations (our macro mean
over every split; the original's micro average over the classification splits, STS-B left out).

The oracle below restates the original's behaviour as a plain sequence of steps (string methods, no
shared helpers), written from a description of what it does; the tests check the implementation against
it on a table of tricky pairs, on generated pairs and on single Unicode characters. Each table row also
states the strict decision, so the places where the two scorings disagree are pinned in both directions.
"""

import csv
import json
import math
import random

import datasets
import numpy as np
import pytest
import torch
from scipy import stats

import lime.evaluation as evaluation
from lime.evaluation import (
    CSV_FIELDS,
    aggregate,
    answers_match,
    original_correlations,
    original_regression_close,
    run_full_evaluation,
)


# ---------------------------------------------------------------------------------------------------
# The oracle: the original's decision, step by step.

def oracle_clean(text):
    """Lower case; delete each <|...|> span (from a "<|" to the first "|>" after it, on one line);
    turn every character that is not a letter/digit/number, '_', whitespace or '.' into a space;
    collapse whitespace; cut trailing dots; trim."""
    text = str(text).lower().strip()
    kept, i = [], 0
    while i < len(text):
        if text.startswith("<|", i):
            end = text.find("|>", i + 2)
            if end != -1 and "\n" not in text[i + 2:end]:
                i = end + 2
                continue
        kept.append(text[i])
        i += 1
    text = "".join(c if (c.isalnum() or c == "_" or c.isspace() or c == ".") else " " for c in kept)
    text = " ".join(text.split())
    while text.endswith("."):
        text = text[:-1]
    return text.strip()


def oracle_canonical(text):
    text = oracle_clean(text)
    if text == "yes":
        return "true"
    if text == "no":
        return "false"
    return text


def oracle_leading_number_text(text):
    """Decimal digits, then optionally one dot and more digits, from the start (no sign); else None."""
    i = 0
    while i < len(text) and text[i].isdecimal():
        i += 1
    if i == 0:
        return None
    if i < len(text) and text[i] == ".":
        i += 1
        while i < len(text) and text[i].isdecimal():
            i += 1
    return text[:i]


def oracle_number(text):
    digits = oracle_leading_number_text(oracle_clean(text))
    return None if digits is None else float(digits)


ORACLE_POSITIVE = {"duplicate", "equivalent", "entailment"}   # each accepts true and "1"
ORACLE_NEGATIVE = {"not_duplicate": "not duplicate", "not_equivalent": "not equivalent",
                   "not_entailment": "not entailment"}          # each (and its spaced form) accepts false and "0"
ORACLE_OPPOSITES = [("acceptable", "unacceptable"), ("grammatical", "ungrammatical"), ("correct", "incorrect"),
                    ("equivalent", "not_equivalent"), ("equivalent", "not equivalent"),
                    ("duplicate", "not_duplicate"), ("duplicate", "not duplicate"),
                    ("entailment", "not_entailment"), ("entailment", "not entailment")]


def oracle_extract(prediction, reference):
    pred = oracle_clean(prediction)
    ref = oracle_canonical(reference)
    words = pred.split()
    first = words[0] if words else ""
    # 1. references with an underscore or a space: found anywhere in the prediction
    if ref != "" and ("_" in ref or " " in ref) and ref in pred:
        return ref
    # 2. an option letter a-z at the start, alone or before a space or a dot (short references only)
    if len(ref) <= 1 and pred != "" and pred[0] in "abcdefghijklmnopqrstuvwxyz":
        if len(pred) == 1 or pred[1] in " .":
            return pred[0]
    # 3. yes/true/no/false as the first word, dots ignored, for boolean (or no) references
    bare = first.replace(".", "")
    if ref in ("", "true", "false"):
        if bare in ("yes", "true"):
            return "true"
        if bare in ("no", "false"):
            return "false"
    # 4. sentiment words as the first word
    if first in ("positive", "negative", "neutral"):
        return first
    # 5. task labels at the start, followed by nothing, a space or a dot (its list has no not_entailment)
    for label in ("duplicate", "not_duplicate", "entailment", "contradiction", "neutral", "equivalent",
                  "not_equivalent", "acceptable", "unacceptable"):
        if pred == label or pred.startswith(label + " ") or pred.startswith(label + "."):
            return label
    # 6. a number at the start
    digits = oracle_leading_number_text(pred)
    if digits is not None:
        return digits
    # 7. the reference as a substring
    if ref != "" and ref in pred:
        return ref
    # 8. the first word
    return first


def oracle_compare(extracted, reference, tolerance=0.5):
    pred, ref = oracle_canonical(extracted), oracle_canonical(reference)
    if pred == ref:
        return True, "exact"
    for positive in ORACLE_POSITIVE:
        if {pred, ref} <= {positive, "true", "1"}:
            return True, "semantic"
    for negative, spaced in ORACLE_NEGATIVE.items():
        if {pred, ref} <= {negative, spaced, "false", "0"}:
            return True, "semantic"
    if {pred, ref} <= {"acceptable", "grammatical", "correct"} or {pred, ref} <= {"unacceptable", "ungrammatical",
                                                                                   "incorrect"}:
        return True, "semantic"
    a, b = oracle_number(extracted), oracle_number(reference)
    if a is not None and b is not None and abs(a - b) <= tolerance:
        return True, "numeric"
    for word, opposite in ORACLE_OPPOSITES:
        if ref == opposite and word in pred or ref == word and opposite in pred:
            return False, "no_match"
        if pred == opposite and word in ref or pred == word and opposite in ref:
            return False, "no_match"
    if ref in pred or pred in ref:
        return True, "contains"
    return False, "no_match"


def oracle(prediction, reference, tolerance=0.5):
    return oracle_compare(oracle_extract(prediction, reference), reference, tolerance)


# ---------------------------------------------------------------------------------------------------
# Tricky pairs: (prediction, reference, strict decision, original decision).

TABLE = [
    # empty predictions: always right for the original ("" is inside every reference)
    ("", "yes", False, True), ("", "wild cat", False, True), ("  ", "3", False, True),
    ("<|im_end|>", "b", False, True), ("...", "not_duplicate", False, True), ("", "", False, True),
    # numbers: within 0.5 for the original (both ends included), containment beyond it
    ("3.4", "3", False, True), ("3.5", "3", False, True), ("2.5", "3", False, True), ("2.4", "3", False, False),
    ("3.6", "3", False, True), ("5.7", "5.5", False, True), ("6.1", "5.5", False, False),
    ("3.0", "3", True, True), ("1976.", "1976", True, True), ("12 apples", "12", True, True),
    ("-1", "-1", True, True), ("-1", "1", False, True),  # the original reads no sign
    # containment either way
    ("13", "3", False, True), ("21", "12", False, False), ("cat", "wild cat", False, True),
    ("wild cat in a tree", "cat", True, True), ("cat", "c", False, True), ("banana", "b", False, True),
    ("a passion flower", "passion flower", True, True), ("passion fruit", "passion flower", False, True),
    ("reddish", "red", False, True), ("not red", "red", False, True),
    # negated labels
    ("not_entailment", "entailment", False, True), ("not entailment", "entailment", False, True),
    ("entailment", "not_entailment", False, False), ("not_duplicate", "duplicate", False, False),
    ("not duplicate", "duplicate", False, True), ("duplicate", "not_duplicate", False, False),
    ("not_duplicate", "not_duplicate", True, True), ("unacceptable", "acceptable", False, False),
    ("acceptable", "unacceptable", False, False), ("equivalent", "not_equivalent", False, False),
    ("entailment", "duplicate", False, False),
    # yes/no as labels
    ("no", "not_duplicate", True, True), ("yes", "duplicate", True, True), ("yes", "1", False, True),
    ("no", "0", False, True), ("yes", "unacceptable", False, False), ("no", "unacceptable", True, False),
    ("correct", "acceptable", False, True),
    # option letters
    ("(B)", "b", True, True), ("b.", "b", True, True), ("B) the cat", "b", True, True), ("(B)", "a", False, False),
    ("The answer is C", "c", True, True), ("option d", "d", True, True), ("c", "b", False, False),
    # special tokens, unicode, punctuation
    ("<|im_end|>yes<|im_end|>", "yes", True, True), ("yes<|im_end|>", "no", False, False),
    ("Café", "café", True, True), ("ÉTÉ", "été", True, True), ("٣", "3", True, True),
    ("naïve", "naive", False, False), ("state-of-the-art", "state of the art", False, True),
    ("positive", "negative", False, False), ("Positive!", "positive", True, True),
]


@pytest.mark.parametrize("prediction,reference,strict,original", TABLE)
def test_strict_and_original_decisions(prediction, reference, strict, original):
    assert answers_match(prediction, reference)[0] is strict
    assert answers_match(prediction, reference, scoring="strict")[0] is strict
    matched, how = answers_match(prediction, reference, scoring="original")
    assert matched is original, (prediction, reference, how)
    assert (matched, how) == oracle(prediction, reference)


def test_the_table_has_disagreements_both_ways():
    lenient = [row for row in TABLE if row[3] and not row[2]]
    stricter_original = [row for row in TABLE if row[2] and not row[3]]
    assert len(lenient) >= 20
    assert stricter_original == [("no", "unacceptable", True, False)]  # "no" is a negation only of not_*


def test_match_types():
    assert answers_match("Yes", "yes", scoring="original") == (True, "exact")
    assert answers_match("yes", "1", scoring="original") == (True, "semantic")
    assert answers_match("3.4", "3", scoring="original") == (True, "numeric")
    assert answers_match("13", "3", scoring="original") == (True, "contains")
    assert answers_match("", "yes", scoring="original") == (True, "contains")
    assert answers_match("2.4", "3", scoring="original") == (False, "no_match")
    assert answers_match("", "yes") == (False, "none")


def test_tolerance():
    # The original's default is 0.5; an explicit tolerance replaces it, for either scoring.
    assert answers_match("2.6", "3", scoring="original") == (True, "numeric")
    assert answers_match("2.6", "3", tolerance=0.1, scoring="original") == (False, "no_match")
    assert answers_match("2.6", "3", tolerance=1e-6)[0] is False
    assert answers_match("2.6", "3", tolerance=0.5) == (True, "numeric")
    assert answers_match("2.6", "3")[0] is False  # strict's default stays 1e-6


@pytest.mark.parametrize("scoring", ["Original", "lenient", "", None, 1])
def test_a_bad_scoring_is_an_error_naming_it(scoring):
    with pytest.raises(ValueError, match=f"scoring={scoring!r}"):
        answers_match("yes", "yes", scoring=scoring)


VOCABULARY = ["yes", "No", "true", "FALSE", "duplicate", "not_duplicate", "not duplicate", "entailment",
              "not_entailment", "equivalent", "not_equivalent", "acceptable", "unacceptable", "correct",
              "ungrammatical", "neutral", "positive", "negative", "contradiction", "a", "B", "(c)", "d.", "[e]",
              "option", "the answer is", "cat", "wild cat", "1", "0", "3", "13", "3.", "3.5", "0.4", "-2", "٣",
              "<|im_end|>", "<|a|b|>", "<|", "|>", "\n", ".", "..", ",", "!", "-", "_", "é", "İ", "ß", "", " "]


def _phrase(rng):
    return "".join(rng.choice(VOCABULARY) + rng.choice(["", " ", ".", "_", ",", "\n"])
                   for _ in range(rng.choice([0, 1, 1, 2, 3])))


def test_the_original_scoring_agrees_with_the_oracle_on_generated_pairs():
    rng = random.Random(0)
    decisions = set()
    for _ in range(20000):
        prediction, reference = _phrase(rng), (rng.choice(VOCABULARY) if rng.random() < 0.4 else _phrase(rng))
        tolerance = rng.choice([0.5, 0.5, 1e-6, 2.0])
        got = answers_match(prediction, reference, tolerance=tolerance, scoring="original")
        assert got == oracle(prediction, reference, tolerance), (prediction, reference, tolerance)
        decisions.add(got)
    assert {how for _, how in decisions} == {"exact", "semantic", "numeric", "contains", "no_match"}


def test_the_original_scoring_agrees_with_the_oracle_on_every_bmp_character():
    # Cleaning and number parsing are Unicode-aware (case folding, \w, \d, whitespace).
    for point in range(0x10000):
        if 0xD800 <= point <= 0xDFFF:
            continue
        c = chr(point)
        for prediction, reference in ((c, "a"), ("b" + c + "x", "b x"), (c + "1", "1")):
            assert answers_match(prediction, reference, scoring="original") == oracle(prediction, reference), point


# ---------------------------------------------------------------------------------------------------
# STS-B both ways.

def test_stsb_rows_and_correlations_both_ways():
    predictions, references = ["1", "2.4", "3.6", "none", "5"], ["1", "2", "3", "0.4", "4.8"]
    # The original: unparsed -> 0.0, so "none" is within 0.5 of 0.4; 2.4 is 0.4 from 2, 3.6 is 0.6 from 3.
    assert [original_regression_close(p, r) for p, r in zip(predictions, references)] == [True, True, False, True,
                                                                                          True]
    assert original_regression_close("none", "0.6") is False
    xs, ys = [1, 2.4, 3.6, 0.0, 5], [1, 2, 3, 0.4, 4.8]
    original = original_correlations(predictions, references)
    assert original["pearson_original"] == pytest.approx(np.corrcoef(xs, ys)[0, 1])
    assert original["spearman_original"] == pytest.approx(stats.spearmanr(xs, ys)[0])
    ours = evaluation._correlations(predictions, references)
    kept = [0, 1, 2, 4]  # ours leaves the unparsed prediction out
    assert ours["parsed_rows"] == 4 and ours["parsed"] == pytest.approx(0.8)
    assert ours["pearson"] == pytest.approx(np.corrcoef([xs[i] for i in kept], [ys[i] for i in kept])[0, 1])
    assert ours["pearson"] != pytest.approx(original["pearson_original"])
    # Undefined correlations: NaN for ours, 0.0 for the original (as it reports them).
    assert original_correlations(["x", "y"], ["1", "2"]) == {"pearson_original": 0.0, "spearman_original": 0.0}
    assert original_correlations(["1"], ["1"]) == {"pearson_original": 0.0, "spearman_original": 0.0}
    assert math.isnan(evaluation._correlations(["x", "y"], ["1", "2"])["pearson"])


# ---------------------------------------------------------------------------------------------------
# Aggregation, end to end through run_full_evaluation with canned answers.

SPLITS = {
    # split: (references, predictions)
    "text_test_clue": (["cat", "dog", "car", "bird"], ["cat", "", "a car", "bird."]),          # strict 3/4, original 4/4
    "glue_test_rte": (["entailment", "not_entailment"], ["not_entailment", "entailment"]),      # strict 0/2, original 1/2
    "glue_test_stsb": (["1", "2", "3", "0.4"], ["1", "2.4", "3.6", "none"]),                    # strict 1/4, within 0.5: 3/4
}


@pytest.fixture
def summary(tmp_path, monkeypatch):
    data = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"source_type": ["text"] * len(refs), "media_path": [""] * len(refs),
                                          "question": [f"q{i}" for i in range(len(refs))], "answer": refs})
        for name, (refs, _) in SPLITS.items()})

    def canned(model, processor, dataset, data_root, split, *rest, **options):
        return list(SPLITS[split][1])

    monkeypatch.setattr(evaluation, "generate_answers", canned)
    result = run_full_evaluation(torch.nn.Linear(1, 1), None, data, str(tmp_path),
                                 save_csv=str(tmp_path / "results.csv"), save_json=str(tmp_path / "results.json"))
    return result, tmp_path


def test_split_metrics_and_prediction_rows(summary):
    result, _ = summary
    text, rte, stsb = (result["splits"][n] for n in SPLITS)
    assert (text["accuracy"], text["accuracy_original"], text["correct"], text["correct_original"]) == (0.75, 1.0, 3, 4)
    assert (rte["accuracy"], rte["accuracy_original"]) == (0.0, 0.5)
    assert (stsb["accuracy"], stsb["accuracy_original"], stsb["parsed_rows"]) == (0.25, 0.75, 3)
    assert stsb["regression"] and not text["regression"] and "pearson_original" in stsb and "pearson" not in text
    rows = result["predictions"]["text_test_clue"]
    assert [(r["correct"], r["how"], r["correct_original"], r["how_original"]) for r in rows][1] == \
        (False, "none", True, "contains")
    assert [r["how_original"] for r in result["predictions"]["glue_test_stsb"]] == ["close", "close", "not_close",
                                                                                     "close"]


def test_micro_and_macro_aggregates(summary):
    result, _ = summary
    glue, overall = result["groups"]["glue"], result["overall"]
    # Ours: macro mean of the strict accuracies over every split, STS-B included.
    assert glue["accuracy"] == pytest.approx((0.0 + 0.25) / 2)
    assert overall["accuracy"] == pytest.approx((0.75 + 0.0 + 0.25) / 3)
    # The original's: micro over the classification splits, STS-B left out.
    assert (glue["micro_correct_original"], glue["micro_samples"], glue["accuracy_original"]) == (1, 2, 0.5)
    assert (overall["micro_correct_original"], overall["micro_samples"]) == (5, 6)
    assert overall["accuracy_original"] == pytest.approx(5 / 6)
    # The crossings: strict decisions micro-averaged, original decisions macro-averaged over every split.
    assert overall["accuracy_micro"] == pytest.approx(3 / 6) and overall["micro_correct"] == 3
    assert overall["accuracy_original_macro"] == pytest.approx((1.0 + 0.5 + 0.75) / 3)
    assert overall["samples"] == 10 and overall["majority"] == pytest.approx((0.25 + 0.5 + 0.25) / 3)


def test_results_files_hold_both_scorings(summary):
    result, directory = summary
    with open(directory / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        rows = {(r["level"], r["name"]): r for r in reader}
    overall, stsb, text = rows["overall", "overall"], rows["split", "glue_test_stsb"], rows["split", "text_test_clue"]
    assert float(overall["accuracy_original"]) == pytest.approx(5 / 6)
    assert (overall["micro_correct_original"], overall["micro_samples"]) == ("5", "6")
    assert float(overall["accuracy"]) == pytest.approx(1 / 3)
    assert float(stsb["pearson_original"]) == pytest.approx(result["splits"]["glue_test_stsb"]["pearson_original"])
    assert stsb["parsed_rows"] == "3" and text["pearson"] == "" and text["micro_samples"] == ""
    assert rows["group", "glue"]["group"] == "glue" and rows["group", "glue"]["accuracy_original"] == "0.5"
    written = json.load(open(directory / "results.json"))
    assert {"splits", "groups", "overall", "predictions", "skipped"} <= set(written)
    assert written["overall"]["micro_correct_original"] == 5
    assert written["predictions"]["glue_test_rte"][0]["correct_original"] is True


def test_the_papers_figure_is_the_micro_average_without_stsb():
    # The original notebook's LoRA run: per-group classification counts, overall 19556/24956 = 78.36%.
    counts = {"glue": (3884, 4280), "image": (7044, 8476), "text": (5522, 6500), "video": (3106, 5700)}
    splits = [{"samples": total, "regression": False, "correct": correct, "correct_original": correct,
               "accuracy": correct / total, "accuracy_original": correct / total, "majority": 0.5}
              for correct, total in counts.values()]
    splits.append({"samples": 1500, "regression": True, "correct": 100, "correct_original": 450,
                   "accuracy": 100 / 1500, "accuracy_original": 0.3, "majority": 0.1})  # an STS-B split
    overall = aggregate(splits)
    assert (overall["micro_correct_original"], overall["micro_samples"]) == (19556, 24956)
    assert round(100 * overall["accuracy_original"], 2) == 78.36
    assert round(100 * overall["accuracy"], 2) != 78.36  # the macro mean, STS-B included, is another figure
