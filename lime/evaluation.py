"""Evaluation on MMT-47's test splits: greedy generation, answer matching, per-split metrics.

Accuracy per split (regression splits, such as GLUE's STS-B, get Pearson and Spearman instead),
means per group (image, text, glue, video) and overall, written as CSV and JSON.

Answer matching, after normalization (lower case, special tokens and punctuation dropped, trailing
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

from .data import MultiModalCollator, MultiModalDataset, split_group, test_splits, validate_split

# Labels a yes/no answer stands for, per task family; each has the opposite that must never match it.
POSITIVE_LABELS = ("duplicate", "equivalent", "entailment", "acceptable")
NEGATIONS = {label: (f"not_{label}", f"not {label}") for label in POSITIVE_LABELS}
NEGATIONS["acceptable"] += ("unacceptable",)
AFFIRMATIVE, NEGATIVE = ("yes", "true"), ("no", "false")
REGRESSION_TASKS = ("stsb",)
NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?")


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


def answers_match(prediction: str, reference: str, tolerance: float = 1e-6) -> Tuple[bool, str]:
    """(match, how): how is 'exact', 'label', 'option', 'numeric', 'words' or 'none'."""
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


def is_regression(split: str) -> bool:
    group = split_group(split)
    return group is not None and group[1] in REGRESSION_TASKS


def _correlations(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    pairs = [(_number(normalize_answer(p)), float(r)) for p, r in zip(predictions, references)]
    parsed = [(p, r) for p, r in pairs if p is not None]
    result = {"parsed": len(parsed) / max(len(pairs), 1)}
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
                     max_new_tokens: int = 50, num_video_frames: int = 8, max_length: int = 2048) -> List[str]:
    """Greedy answers for every row of one split (left-padded prompts)."""
    samples = MultiModalDataset(dataset, processor, data_root, num_video_frames, max_length, with_answer=False,
                                split=split)
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
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        except Exception as error:  # re-raised with the rows it concerns, never swallowed
            raise RuntimeError(f"evaluation of split {split!r} failed on rows {rows[0]}..{rows[-1]}: {error}") from error
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        own[start] = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    if world > 1:
        gathered: List[Optional[Dict[int, List[str]]]] = [None] * world
        dist.all_gather_object(gathered, own)
        own = {start: answers for part in gathered for start, answers in part.items()}
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


def run_full_evaluation(model, processor, dataset, data_root: str = "", num_samples_per_split: Optional[int] = None,
                        batch_size: int = 6, max_new_tokens: int = 50, save_csv: Optional[str] = None,
                        save_json: Optional[str] = None, num_video_frames: int = 8, max_length: int = 2048,
                        splits: Optional[Sequence[str]] = None, skip_bad_rows: bool = False,
                        tolerance: float = 1e-6) -> Dict:
    """Evaluate every `<group>_test_<task>` split (or `splits`) of `dataset` (a DatasetDict).

    Returns {"splits": {name: metrics}, "groups": {group: metrics}, "overall": metrics,
    "predictions": {name: [{row, question, answer, prediction, correct, how}]}, "skipped": [...]};
    writes `save_csv` (one row per split, group and overall) and `save_json` (everything) if given
    (on rank 0 only when several processes share the work; every process returns the summary).
    """
    check_sizes(batch_size=batch_size, max_new_tokens=max_new_tokens, num_samples_per_split=num_samples_per_split,
                num_video_frames=num_video_frames, max_length=max_length)
    names = list(splits) if splits is not None else test_splits(dataset)
    if not names:
        raise ValueError(f"no test split to evaluate: splits are named <group>_test_<task>; got {list(dataset)}")
    unknown = [name for name in names if name not in dataset]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; the dataset has {list(dataset)}")
    was_training = model.training
    model.eval()
    results, predictions, skipped = {}, {}, []
    for name in names:
        split = dataset[name]
        if num_samples_per_split is not None:
            split = split.select(range(min(num_samples_per_split, len(split))))
        split, bad = validate_split(split, name, data_root, skip_bad_rows=skip_bad_rows)
        skipped += [str(b) for b in bad]
        answers = generate_answers(model, processor, split, data_root, name, batch_size, max_new_tokens,
                                   num_video_frames, max_length)
        references = [str(a) for a in split["answer"]]
        rows = []
        for row, (question, reference, prediction) in enumerate(zip(split["question"], references, answers)):
            correct, how = answers_match(prediction, reference, tolerance)
            rows.append({"row": row, "question": question, "answer": reference, "prediction": prediction,
                         "correct": correct, "how": how})
        group, task = split_group(name) or ("other", name)
        # A split left with no rows (every row skipped) has no accuracy: NaN, and the means leave it out.
        metrics = {"group": group, "task": task, "samples": len(rows),
                   "accuracy": sum(r["correct"] for r in rows) / len(rows) if rows else float("nan"),
                   "majority": majority_rate(references)}
        if is_regression(name):
            metrics.update(_correlations(answers, references))
        results[name] = metrics
        predictions[name] = rows
    if was_training:
        model.train()

    groups = defaultdict(list)
    for name, metrics in results.items():
        groups[metrics["group"]].append(metrics)

    def means(splits: Sequence[Dict]) -> Dict:
        return {"splits": len(splits), "accuracy": _mean_of_scored([m["accuracy"] for m in splits]),
                "majority": _mean_of_scored([m["majority"] for m in splits])}

    summary = {
        "splits": results,
        "groups": {group: means(splits) for group, splits in sorted(groups.items())},
        "overall": {**means(list(results.values())), "samples": sum(m["samples"] for m in results.values())},
        "predictions": predictions,
        "skipped": skipped,
    }
    writing = _process_rank_and_count()[0] == 0
    if save_csv and writing:
        write_csv(summary, save_csv)
    if save_json and writing:
        os.makedirs(os.path.dirname(os.path.abspath(save_json)), exist_ok=True)
        with open(save_json, "w", encoding="utf-8") as handle:
            json.dump(_without_nan(summary), handle, indent=2, allow_nan=False)
    return summary


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


CSV_FIELDS = ("level", "name", "group", "task", "samples", "accuracy", "majority", "pearson", "spearman", "parsed")


def write_csv(summary: Dict, path: str) -> None:
    """One row per split, per group (mean accuracy over its splits) and overall."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for name, metrics in summary["splits"].items():
            writer.writerow({"level": "split", "name": name, **{k: metrics.get(k, "") for k in CSV_FIELDS[2:]}})
        for group, metrics in summary["groups"].items():
            writer.writerow({"level": "group", "name": group, "group": group, "samples": "",
                             "accuracy": metrics["accuracy"], "majority": metrics["majority"]})
        overall = summary["overall"]
        writer.writerow({"level": "overall", "name": "overall", "samples": overall["samples"],
                         "accuracy": overall["accuracy"], "majority": overall["majority"]})
