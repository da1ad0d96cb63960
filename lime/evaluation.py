"""Evaluation on MMT-47's test splits: greedy generation, answer matching, per-split metrics.

Accuracy per split (regression splits, such as GLUE's STS-B, get Pearson and Spearman instead),
means per group (image, text, glue, video) and overall, written as CSV and JSON.

Two scorings, both reported: "strict" (this project's, `accuracy`) and "original" (the original LiME
code's lenient one, `accuracy_original`, the scoring behind the paper's MMT-47 table; `answers_match`
lists its quirks). Aggregates both ways: our macro mean over every split (STS-B's accuracy included),
and the original's micro average (correct / rows) over the classification splits, STS-B left out.

Strict answer matching, after normalization (lower case, special tokens and punctuation dropped, trailing
dots removed): exact; yes/no/true/false and the label each stands for in its task (duplicate,
equivalent, entailment, acceptable / their negations); option letters ("B", "(b)", "b.", "option
B"); numbers within a tolerance ("3." and "3.0" match "3"); multi-word answers as a word sequence at
the start of the prediction or anywhere in it. Guards: a negated or prefixed label ("not_duplicate",
"not duplicate", "unacceptable") never matches the plain one, nor the other way round.

Under several processes (`torch.distributed` initialized, as `lime eval` does under `torchrun` or
`accelerate launch`) each process generates every world-size-th batch of a split, the answers are
gathered in the rows' order, and rank 0 alone writes the files: since every batch holds the same
rows as in a single-process run, the results are the same.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from lime_kernels.options import positive_integer

from .data import (MultiModalCollator, MultiModalDataset, check_frame_rounding, check_truncation, split_group,
                   test_splits, validate_split)

# Labels a yes/no answer stands for, per task family; each has the opposite that must never match it.
POSITIVE_LABELS = ("duplicate", "equivalent", "entailment", "acceptable")
NEGATIONS = {label: (f"not_{label}", f"not {label}") for label in POSITIVE_LABELS}
NEGATIONS["acceptable"] += ("unacceptable",)
AFFIRMATIVE, NEGATIVE = ("yes", "true"), ("no", "false")
REGRESSION_TASKS = ("stsb",)
NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?")
SCORINGS = ("strict", "original")
STRICT_TOLERANCE = 1e-6
ORIGINAL_TOLERANCE = 0.5  # the original's numeric tolerance, with which the paper's table was scored


def normalize_answer(text: str) -> str:
    """Lower case, special tokens removed, punctuation but '.', '_' and '-' turned into spaces,
    whitespace collapsed, trailing dots removed."""
    text = re.sub(r"<\|[^|]*\|>", " ", str(text).lower())
    text = re.sub(r"[^\w\s.\-]", " ", text)
    text = " ".join(text.split())
    return re.sub(r"\.+$", "", text).strip()


def _number(text: str) -> Optional[float]:
    match = NUMBER.match(text)
    return float(match.group(0)) if match else None


def _words(text: str) -> List[str]:
    return [word.strip(".") for word in text.split()]


def _option_letter(text: str) -> Optional[str]:
    match = re.match(r"^(?:option|answer|the answer is)?\s*\(?([a-e])\)?(?:[.:,)\s]|$)", text)
    return match.group(1) if match else None


def _meaning(text: str) -> Optional[str]:
    """'positive' / 'negative' for yes/no/true/false, else the label (or its negation) a text starts with."""
    words = _words(text)
    if not words:
        return None
    if words[0] in AFFIRMATIVE:
        return "positive"
    if words[0] in NEGATIVE:
        return "negative"
    for label, negations in NEGATIONS.items():
        for negation in negations:
            if text == negation or text.startswith(negation + " "):
                return f"not:{label}"
        if words[0] == label:
            return f"is:{label}"
    return None


def _contains_words(haystack: List[str], needle: List[str]) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def answers_match(prediction: str, reference: str, tolerance: Optional[float] = None,
                  scoring: str = "strict") -> Tuple[bool, str]:
    """(match, how) for one prediction against its reference answer.

    scoring="strict" (default): this project's rules (the module docstring); how is 'exact', 'label',
    'option', 'numeric', 'words' or 'none'; numbers match within `tolerance` (default 1e-6).

    scoring="original": the decision of the original LiME code's classification scoring (its answer
    extraction, guided by the reference, followed by its comparison with a numeric tolerance of 0.5,
    `tolerance` overriding it), quirks included; how is the original's own match type: 'exact',
    'semantic', 'numeric', 'contains' or 'no_match'. Its quirks, each a difference from strict:
      - an empty prediction (or one that is only special tokens or punctuation) is always correct: the
        empty string is contained in every reference;
      - containment either way counts: "13" for "3", "3.6" for "3" (besides the 0.5 tolerance), "cat"
        for "wild cat", "wild cat in a tree" for "cat", and a one-letter reference ("c") for any
        prediction holding that letter ("cat"), unless the prediction leads with another option letter;
      - numbers within 0.5 count ("3.4" for "3", "5.7" for "5.5"); numbers carry no sign;
      - "not_entailment" and "not entailment" count for "entailment", and "not duplicate" for
        "duplicate" (the reference is found inside them); the reverse, and "not_duplicate" for
        "duplicate", do not;
      - yes / true / "1" count for duplicate, equivalent and entailment, no / false / "0" for their
        negations; "correct" and "grammatical" for acceptable; a reference "1" accepts "yes";
      - special tokens such as <|im_end|> are deleted rather than spaced, '-' and other punctuation
        but '_' and '.' become spaces, so "(B)" and "b." read as "b".
    STS-B is not scored with this in the original (see `original_regression_close`).

    Any other `scoring` is a ValueError naming it.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}; got scoring={scoring!r}")
    if scoring == "original":
        return _original_match(prediction, reference, ORIGINAL_TOLERANCE if tolerance is None else tolerance)
    return _strict_match(prediction, reference, STRICT_TOLERANCE if tolerance is None else tolerance)


def _strict_match(prediction: str, reference: str, tolerance: float) -> Tuple[bool, str]:
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred:
        return False, "none"
    if pred == ref:
        return True, "exact"

    ref_meaning, pred_meaning = _meaning(ref), _meaning(pred)
    if ref_meaning is not None and pred_meaning is not None:
        # yes == the positive label, no == its negation; two different labels never match.
        positive = {"positive"} | {m for m in (ref_meaning, pred_meaning) if m.startswith("is:")}
        negative = {"negative"} | {m for m in (ref_meaning, pred_meaning) if m.startswith("not:")}
        same_label = len({m.split(":")[1] for m in (ref_meaning, pred_meaning) if ":" in m}) <= 1
        matched = same_label and ({ref_meaning, pred_meaning} <= positive or {ref_meaning, pred_meaning} <= negative)
        return (True, "label") if matched else (False, "none")

    if re.fullmatch(r"[a-e]", ref):
        return (True, "option") if _option_letter(pred) == ref else (False, "none")

    ref_number = _number(ref) if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", ref) else None
    if ref_number is not None:
        pred_number = _number(pred)
        close = pred_number is not None and math.isclose(pred_number, ref_number, rel_tol=tolerance, abs_tol=tolerance)
        return (True, "numeric") if close else (False, "none")

    ref_words, pred_words = _words(ref), _words(pred)
    if not ref_words:
        return False, "none"
    negated = any(pred_words[i] in ("not", "no") and pred_words[i + 1:i + 1 + len(ref_words)] == ref_words
                  for i in range(len(pred_words) - 1))
    if not negated and (pred_words[:len(ref_words)] == ref_words or _contains_words(pred_words, ref_words)):
        return True, "words"
    return False, "none"


# The original LiME code's scoring, rewritten from a reading of its behaviour (same decisions, not its code).
# Its cleaning: lower case; special tokens deleted (shortest <|...|> span on one line); every character
# other than a word character, whitespace or '.' turned into a space; whitespace collapsed; trailing dots cut.
_ORIGINAL_SPECIAL_TOKEN = re.compile(r"<\|.*?\|>")
_ORIGINAL_PUNCTUATION = re.compile(r"[^\w\s.]")
_ORIGINAL_NUMBER = re.compile(r"\d+(?:\.\d*)?")  # unsigned, at the start; "3." is a number
# Answers it accepts for one another (yes/no already read as true/false); two labels of different tasks
# ("duplicate" and "equivalent") are not in one set, so they do not.
_ORIGINAL_SAME_MEANING = tuple(frozenset(answers) for answers in (
    ("true", "1", "duplicate"), ("true", "1", "equivalent"), ("true", "1", "entailment"),
    ("false", "0", "not_duplicate", "not duplicate"), ("false", "0", "not_equivalent", "not equivalent"),
    ("false", "0", "not_entailment", "not entailment"),
    ("acceptable", "grammatical", "correct"), ("unacceptable", "ungrammatical", "incorrect"),
))
# Opposite labels: if one side is one of a pair and the other side contains its opposite, no match.
_ORIGINAL_OPPOSITES = (
    ("acceptable", "unacceptable"), ("grammatical", "ungrammatical"), ("correct", "incorrect"),
    ("equivalent", "not_equivalent"), ("equivalent", "not equivalent"), ("duplicate", "not_duplicate"),
    ("duplicate", "not duplicate"), ("entailment", "not_entailment"), ("entailment", "not entailment"),
)
# Labels it takes from the start of a prediction when followed by a space, a dot or nothing. The
# list has no "not_entailment": that is why "not_entailment" is read as "entailment".
_ORIGINAL_LEADING_LABELS = frozenset(("duplicate", "not_duplicate", "entailment", "contradiction", "neutral",
                                      "equivalent", "not_equivalent", "acceptable", "unacceptable"))
_ORIGINAL_SENTIMENTS = frozenset(("positive", "negative", "neutral"))


def _original_clean(text: str) -> str:
    text = _ORIGINAL_SPECIAL_TOKEN.sub("", str(text).lower())
    text = " ".join(_ORIGINAL_PUNCTUATION.sub(" ", text).split())
    return text.rstrip(".").strip()


def _original_canonical(text: str) -> str:
    """Cleaned, with yes/no read as true/false."""
    cleaned = _original_clean(text)
    return {"yes": "true", "no": "false"}.get(cleaned, cleaned)


def _original_number(text: str) -> Optional[float]:
    match = _ORIGINAL_NUMBER.match(_original_clean(text))
    return float(match.group(0)) if match else None


def _original_extract(prediction: str, reference: str) -> str:
    """The answer the original reads out of a prediction; the reference steers it."""
    pred, ref = _original_clean(prediction), _original_canonical(reference)
    words = pred.split()
    first = words[0] if words else ""
    # A reference with an underscore or a space is taken wherever it occurs in the prediction.
    if ("_" in ref or " " in ref) and ref in pred:
        return ref
    # A leading option letter, alone or followed by a space or dot, when the reference has at most one
    # character (so a one-digit number reference also takes it).
    if len(ref) <= 1 and re.match(r"[a-z](?:[ .]|$)", pred):
        return pred[0]
    # yes/true/no/false as the first word (its dots ignored), for a true/false reference only.
    boolean = {"yes": "true", "true": "true", "no": "false", "false": "false"}.get(first.replace(".", ""))
    if boolean is not None and ref in ("", "true", "false"):
        return boolean
    if first in _ORIGINAL_SENTIMENTS:
        return first
    head = re.split(r"[ .]", pred, maxsplit=1)[0]
    if head in _ORIGINAL_LEADING_LABELS:
        return head
    number = _ORIGINAL_NUMBER.match(pred)
    if number:
        return number.group(0)
    # Plain substring search: this is what lets "cat" answer "c" and "not duplicate" answer "duplicate".
    if ref and ref in pred:
        return ref
    return first


def _original_compare(extracted: str, reference: str, tolerance: float) -> Tuple[bool, str]:
    pred, ref = _original_canonical(extracted), _original_canonical(reference)
    if pred == ref:
        return True, "exact"
    if any(pred in answers and ref in answers for answers in _ORIGINAL_SAME_MEANING):
        return True, "semantic"
    pred_number, ref_number = _original_number(extracted), _original_number(reference)
    if pred_number is not None and ref_number is not None and abs(pred_number - ref_number) <= tolerance:
        return True, "numeric"
    for one, other in _ORIGINAL_OPPOSITES:
        for side, opposite_side in ((pred, ref), (ref, pred)):
            if (side == one and other in opposite_side) or (side == other and one in opposite_side):
                return False, "no_match"
    # Containment either way; an empty prediction is contained in every reference.
    if ref in pred or pred in ref:
        return True, "contains"
    return False, "no_match"


def _original_match(prediction: str, reference: str, tolerance: float) -> Tuple[bool, str]:
    return _original_compare(_original_extract(prediction, reference), reference, tolerance)


def original_regression_close(prediction: str, reference: str, tolerance: float = ORIGINAL_TOLERANCE) -> bool:
    """The original's per-row STS-B decision: the leading unsigned number of each side, 0.0 where there
    is none, within `tolerance` (so an unparsed prediction is correct for a reference of at most 0.5)."""
    pred, ref = _original_number(prediction), _original_number(reference)
    return abs((0.0 if pred is None else pred) - (0.0 if ref is None else ref)) <= tolerance


def original_correlations(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """The original's STS-B Pearson and Spearman: every row kept, an unparsed prediction (or reference)
    read as 0.0; undefined correlations (fewer than 2 rows, a constant side) reported as 0.0, as it does."""
    xs = [0.0 if n is None else n for n in map(_original_number, predictions)]
    ys = [0.0 if n is None else n for n in map(_original_number, references)]
    if len(xs) < 2 or len(set(xs)) == 1 or len(set(ys)) == 1:
        # scipy would return NaN (with a warning) here; the original turns NaN into 0.0.
        return {"pearson_original": 0.0, "spearman_original": 0.0}
    pearson, spearman = float(scipy_stats.pearsonr(xs, ys)[0]), float(scipy_stats.spearmanr(xs, ys)[0])
    return {"pearson_original": 0.0 if math.isnan(pearson) else pearson,
            "spearman_original": 0.0 if math.isnan(spearman) else spearman}


def is_regression(split: str) -> bool:
    group = split_group(split)
    return group is not None and group[1] in REGRESSION_TASKS


def _correlations(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Our STS-B correlations: over the predictions that parse as a number (unparsed ones left out);
    `parsed` is their share, `parsed_rows` their count."""
    pairs = [(_number(normalize_answer(p)), float(r)) for p, r in zip(predictions, references)]
    parsed = [(p, r) for p, r in pairs if p is not None]
    result = {"parsed": len(parsed) / max(len(pairs), 1), "parsed_rows": len(parsed)}
    if len(parsed) >= 2 and len({p for p, _ in parsed}) > 1 and len({r for _, r in parsed}) > 1:
        xs, ys = zip(*parsed)
        result["pearson"] = float(scipy_stats.pearsonr(xs, ys)[0])
        result["spearman"] = float(scipy_stats.spearmanr(xs, ys)[0])
    else:
        # Too few parsed or constant predictions: the correlation is undefined, and reported as such.
        result["pearson"] = result["spearman"] = float("nan")
    return result


@torch.no_grad()
def generate_answers(model, processor, dataset, data_root: str, split: str, batch_size: int = 6,
                     max_new_tokens: int = 50, num_video_frames: int = 8, max_length: int = 2048,
                     frame_rounding: str = "round", truncate: Optional[str] = None,
                     truncated_rows: Optional[List[int]] = None, compile: bool = False) -> List[str]:
    """Greedy answers for every row of one split (left-padded prompts). `frame_rounding` and `truncate`
    as `MultiModalDataset` takes them; the rows cut to `max_length` (by every process) are appended to
    `truncated_rows` if given. `compile`: decode with a static cache through a compiled decoding step
    (`compiled_generation`)."""
    samples = MultiModalDataset(dataset, processor, data_root, num_video_frames, max_length, with_answer=False,
                                split=split, frame_rounding=frame_rounding, truncate=truncate)
    collate = MultiModalCollator(processor, max_length=max_length, padding_side="left")
    device = next(model.parameters()).device
    rank, world = _process_rank_and_count()
    # Whole batches per process (not rows): each batch is the single-process run's, padding included.
    starts = list(range(0, len(samples), batch_size))
    own: Dict[int, List[str]] = {}
    for start in tqdm(starts[rank::world], desc=split, leave=False, disable=rank != 0):
        rows = list(range(start, min(start + batch_size, len(samples))))
        try:
            batch = collate([samples[i] for i in rows])
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            if "pixel_values_videos" in batch:
                batch["pixel_values_videos"] = batch["pixel_values_videos"].to(model.dtype)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    **(compiled_generation() if compile else {}))
        except Exception as error:  # re-raised with the rows it concerns, never swallowed
            raise RuntimeError(f"evaluation of split {split!r} failed on rows {rows[0]}..{rows[-1]}: {error}") from error
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        own[start] = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    cut = sorted(samples.truncated)
    if world > 1:
        gathered: List[Optional[Tuple[Dict[int, List[str]], List[int]]]] = [None] * world
        dist.all_gather_object(gathered, (own, cut))
        own = {start: answers for part, _ in gathered for start, answers in part.items()}
        cut = sorted(row for _, rows in gathered for row in rows)
    if truncated_rows is not None:
        truncated_rows.extend(cut)
    return [answer for start in starts for answer in own[start]]


def _process_rank_and_count() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_sizes(**sizes) -> None:
    """Each size a positive integer (None: not given), else a ValueError naming it."""
    for name, value in sizes.items():
        if value is not None:
            positive_integer(name, value)


def compiled_generation() -> Dict:
    """generate()'s options for a compiled decoding step: a static cache, whose decoding step transformers
    compiles with torch.compile (one graph: LiME adds no break, tests/test_compile.py), in CompileConfig's
    default mode, "reduce-overhead" (CUDA graphs on a GPU). transformers
    compiles it on a GPU by itself; `_compile_all_devices` (an attribute, not a keyword) asks for it on
    any device. Each new prompt length compiles the step again, as torch.compile does for new shapes."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def run_full_evaluation(model, processor, dataset, data_root: str = "", num_samples_per_split: Optional[int] = None,
                        batch_size: int = 6, max_new_tokens: int = 50, save_csv: Optional[str] = None,
                        save_json: Optional[str] = None, num_video_frames: int = 8, max_length: int = 2048,
                        splits: Optional[Sequence[str]] = None, skip_bad_rows: bool = False,
                        tolerance: float = 1e-6, frame_rounding: str = "round", truncate: Optional[str] = None,
                        compile: bool = False) -> Dict:
    """Evaluate every `<group>_test_<task>` split (or `splits`) of `dataset` (a DatasetDict).

    Returns {"splits": {name: metrics}, "groups": {group: metrics}, "overall": metrics,
    "predictions": {name: [{row, question, answer, prediction, correct, how, correct_original,
    how_original}]}, "skipped": [...]}; writes `save_csv` (one row per split, group and overall) and
    `save_json` (everything) if given (on rank 0 only when several processes share the work; every
    process returns the summary). `compile`: generation through a compiled decoding step
    (`compiled_generation`; prompt tuning cannot use its static cache and says so).

    Every row is scored both ways: strict (`answers_match`, numbers within `tolerance`) and as the
    original code scores it (`answers_match(..., scoring="original")`; on a regression split its
    distance rule, `original_regression_close`). A split's metrics: samples, correct, accuracy,
    correct_original, accuracy_original, majority, regression; a regression split (STS-B) adds ours,
    pearson / spearman over the parsed predictions with parsed (share) and parsed_rows (count), and the
    original's, pearson_original / spearman_original with unparsed read as 0.0 (its accuracy_original
    is then the share within 0.5). A group's and the overall metrics: accuracy, our macro mean of the
    splits' strict accuracies (STS-B included); accuracy_original, the original's micro average of its
    own decisions over the classification splits (micro_correct_original / micro_samples, STS-B left
    out: the paper's MMT-47 figure); and the two crossings, accuracy_micro (strict decisions, micro,
    micro_correct / micro_samples) and accuracy_original_macro (original decisions, macro over every split).
    """
    check_sizes(batch_size=batch_size, max_new_tokens=max_new_tokens, num_samples_per_split=num_samples_per_split,
                num_video_frames=num_video_frames, max_length=max_length)
    check_frame_rounding(frame_rounding)
    check_truncation(truncate)
    names = list(splits) if splits is not None else test_splits(dataset)
    if not names:
        raise ValueError(f"no test split to evaluate: splits are named <group>_test_<task>; got {list(dataset)}")
    unknown = [name for name in names if name not in dataset]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; the dataset has {list(dataset)}")
    was_training = model.training
    model.eval()
    results, predictions, skipped, truncated = {}, {}, [], {}
    for name in names:
        split = dataset[name]
        if num_samples_per_split is not None:
            split = split.select(range(min(num_samples_per_split, len(split))))
        split, bad = validate_split(split, name, data_root, skip_bad_rows=skip_bad_rows)
        skipped += [str(b) for b in bad]
        cut: List[int] = []
        answers = generate_answers(model, processor, split, data_root, name, batch_size, max_new_tokens,
                                   num_video_frames, max_length, frame_rounding, truncate, truncated_rows=cut,
                                   compile=compile)
        if cut:
            truncated[name] = cut
        references = [str(a) for a in split["answer"]]
        regression = is_regression(name)
        rows = []
        for row, (question, reference, prediction) in enumerate(zip(split["question"], references, answers)):
            correct, how = answers_match(prediction, reference, tolerance)
            if regression:
                # The original scores STS-B rows by distance alone, not with its answer matching.
                correct_original = original_regression_close(prediction, reference)
                how_original = "close" if correct_original else "not_close"
            else:
                correct_original, how_original = answers_match(prediction, reference, scoring="original")
            rows.append({"row": row, "question": question, "answer": reference, "prediction": prediction,
                         "correct": correct, "how": how, "correct_original": correct_original,
                         "how_original": how_original})
        group, task = split_group(name) or ("other", name)
        correct, correct_original = sum(r["correct"] for r in rows), sum(r["correct_original"] for r in rows)
        # A split left with no rows (every row skipped) has no accuracy: NaN, and the means leave it out.
        metrics = {"group": group, "task": task, "samples": len(rows), "regression": regression,
                   "correct": correct, "accuracy": correct / len(rows) if rows else float("nan"),
                   "correct_original": correct_original,
                   "accuracy_original": correct_original / len(rows) if rows else float("nan"),
                   "majority": majority_rate(references)}
        if regression:
            metrics.update(_correlations(answers, references))
            metrics.update(original_correlations(answers, references))
        results[name] = metrics
        predictions[name] = rows
    if was_training:
        model.train()

    groups = defaultdict(list)
    for name, metrics in results.items():
        groups[metrics["group"]].append(metrics)

    summary = {
        "splits": results,
        "groups": {group: aggregate(splits) for group, splits in sorted(groups.items())},
        "overall": {**aggregate(list(results.values())), "samples": sum(m["samples"] for m in results.values())},
        "predictions": predictions,
        "skipped": skipped,
        # Over-long rows cut to max_length (`truncate`): their count, and their rows by split.
        "truncated": {"count": sum(len(rows) for rows in truncated.values()), "rows": truncated},
    }
    writing = _process_rank_and_count()[0] == 0
    if save_csv and writing:
        write_csv(summary, save_csv)
    if save_json and writing:
        os.makedirs(os.path.dirname(os.path.abspath(save_json)), exist_ok=True)
        with open(save_json, "w", encoding="utf-8") as handle:
            json.dump(_without_nan(summary), handle, indent=2, allow_nan=False)
    return summary


def aggregate(splits: Sequence[Dict]) -> Dict:
    """A group's or the overall metrics from its splits' (see `run_full_evaluation`): macro means over
    every split that has rows, and micro averages over the classification splits (regression left out,
    as the original does)."""
    classified = [m for m in splits if not m["regression"]]
    micro_samples = sum(m["samples"] for m in classified)
    micro_correct = sum(m["correct"] for m in classified)
    micro_correct_original = sum(m["correct_original"] for m in classified)
    return {"splits": len(splits),
            "accuracy": _mean_of_scored([m["accuracy"] for m in splits]),
            "accuracy_original": micro_correct_original / micro_samples if micro_samples else float("nan"),
            "accuracy_micro": micro_correct / micro_samples if micro_samples else float("nan"),
            "accuracy_original_macro": _mean_of_scored([m["accuracy_original"] for m in splits]),
            "micro_correct": micro_correct, "micro_correct_original": micro_correct_original,
            "micro_samples": micro_samples,
            "majority": _mean_of_scored([m["majority"] for m in splits])}


def majority_rate(references: Sequence[str]) -> float:
    """The share of the most common reference answer: the accuracy of always giving that answer, the
    floor a model's accuracy is read against (NaN for no rows)."""
    if not references:
        return float("nan")
    return Counter(references).most_common(1)[0][1] / len(references)


def _mean_of_scored(accuracies: Sequence[float]) -> float:
    """The mean over the splits that had rows (NaN if none had)."""
    scored = [a for a in accuracies if not math.isnan(a)]
    return sum(scored) / len(scored) if scored else float("nan")


def _without_nan(value):
    """Strict JSON: an undefined metric (NaN) is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value


CSV_FIELDS = ("level", "name", "group", "task", "samples", "accuracy", "accuracy_original", "correct",
              "correct_original", "majority", "pearson", "spearman", "parsed", "parsed_rows", "pearson_original",
              "spearman_original", "accuracy_micro", "accuracy_original_macro", "micro_correct",
              "micro_correct_original", "micro_samples")


def write_csv(summary: Dict, path: str) -> None:
    """One row per split, per group and overall; a field a level does not have is left empty (the
    micro_* counts and the crossings are the group's and overall's, the correlations STS-B's)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        rows = [("split", name, metrics) for name, metrics in summary["splits"].items()]
        rows += [("group", group, {**metrics, "group": group}) for group, metrics in summary["groups"].items()]
        rows.append(("overall", "overall", summary["overall"]))
        for level, name, metrics in rows:
            writer.writerow({"level": level, "name": name, **{k: metrics.get(k, "") for k in CSV_FIELDS[2:]}})
