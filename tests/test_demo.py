"""The demo end to end, as `make demo` runs it: it trains, evaluates, writes every promised file, and
shows a model that learned something (the README's numbers)."""

import csv
import json
import os

from lime import demo


def test_demo_writes_the_adapter_the_results_and_the_plot(tmp_path, capsys):
    out = str(tmp_path / "demo-output")
    summary = demo.run(out)
    printed = capsys.readouterr().out
    assert "LiME summary" in printed and "overall" in printed and "training loss" in printed
    # Learning rates too high once made the tiny model collapse to one answer-free output (every prediction
    # empty, accuracy 0): the demo must show training at work.
    assert summary["training_loss"]["last_logged"] < 0.5 * summary["training_loss"]["first_logged"]
    predictions = [row["prediction"] for rows in summary["predictions"].values() for row in rows]
    assert sum(bool(p.strip()) for p in predictions) >= len(predictions) // 2, predictions
    assert summary["overall"]["accuracy"] > 0
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    with open(os.path.join(out, "eval", "results.csv"), newline="") as handle:
        levels = [row["level"] for row in csv.DictReader(handle)]
    assert levels.count("split") == 5 and levels.count("group") == 4 and levels.count("overall") == 1
    assert json.load(open(os.path.join(out, "eval", "results.json")))["overall"]["samples"] == 30
    with open(os.path.join(out, "routing.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(summary["groups"]) == {"glue", "image", "text", "video"}
