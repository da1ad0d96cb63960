"""The demo end to end, as `make demo` runs it: it trains, evaluates, writes every promised file, and
shows a model that learned every group's task (the README's numbers).

The bound: every group's accuracy at least its majority-answer rate (the accuracy of always giving the
most common answer) plus MARGIN. With 24 test rows per split, a split's accuracy at chance level has a
standard error of at most 0.10 (0.09 for the four-answer splits), so 0.3 above the majority rate is
three standard errors or more: answering one label everywhere (the collapse the demo once showed)
cannot reach it, and guessing at random reaches it with odds of about 1 in 1000 or less per split.
"""

import csv
import json
import os

import pytest

from lime import demo

MARGIN = 0.3
SPLITS = {"image_test_color", "video_test_color", "text_test_clue", "glue_test_sst2", "glue_test_stsb"}
# The majority-answer rates the demo's balanced test splits have (24 rows each).
MAJORITY = {"image_test_color": 0.25, "video_test_color": 0.25, "text_test_clue": 0.25, "glue_test_sst2": 0.5,
            "glue_test_stsb": 1 / 6}


def assert_every_group_beats_its_majority_rate(summary, seed):
    assert set(summary["splits"]) == SPLITS
    for name, metrics in summary["splits"].items():
        assert metrics["samples"] == demo.TEST_ROWS
        assert metrics["majority"] == pytest.approx(MAJORITY[name])
    assert set(summary["groups"]) == {"glue", "image", "text", "video"}
    report = {group: (round(m["accuracy"], 3), round(m["majority"], 3)) for group, m in summary["groups"].items()}
    for group, metrics in summary["groups"].items():
        assert metrics["accuracy"] >= metrics["majority"] + MARGIN, f"seed {seed}: (accuracy, majority) {report}"


def test_demo_writes_the_adapter_the_results_and_the_plot(tmp_path, capsys):
    out = str(tmp_path / "demo-output")
    summary = demo.run(out)
    printed = capsys.readouterr().out
    assert "LiME summary" in printed and "overall" in printed and "training loss" in printed
    assert "majority" in printed
    for group, metrics in summary["groups"].items():  # each group's line shows both numbers
        assert f"{'group ' + group:<22} {'':>7} {metrics['accuracy']:>9.3f} {metrics['majority']:>9.3f}" in printed
    # Learning rates too high once made the tiny model collapse to one answer-free output (every prediction
    # empty, accuracy 0): the demo must show training at work.
    assert summary["training_loss"]["last_logged"] < 0.5 * summary["training_loss"]["first_logged"]
    predictions = [row["prediction"] for rows in summary["predictions"].values() for row in rows]
    assert sum(bool(p.strip()) for p in predictions) >= len(predictions) // 2, predictions
    assert summary["overall"]["accuracy"] > 0
    # A model answering "positive" nearly everywhere once scored 0.067: every group must beat always
    # giving its most common answer, by a margin the sample sizes cannot explain.
    assert_every_group_beats_its_majority_rate(summary, seed=0)
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    with open(os.path.join(out, "eval", "results.csv"), newline="") as handle:
        levels = [row["level"] for row in csv.DictReader(handle)]
    assert levels.count("split") == 5 and levels.count("group") == 4 and levels.count("overall") == 1
    with open(os.path.join(out, "eval", "results.json")) as handle:
        results = json.load(handle)
    assert results["overall"]["samples"] == 5 * demo.TEST_ROWS == 120
    assert results["groups"]["glue"]["majority"] == pytest.approx(summary["groups"]["glue"]["majority"])
    with open(os.path.join(out, "routing.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_demo_learns_every_group_for_other_seeds(tmp_path, seed):
    summary = demo.run(str(tmp_path / "demo-output"), seed=seed)
    assert summary["training_loss"]["last_logged"] < 0.5 * summary["training_loss"]["first_logged"]
    assert_every_group_beats_its_majority_rate(summary, seed)
