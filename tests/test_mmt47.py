"""MMT-47 data, evaluation and the command line: answer matching, label masking, video frames,
schema errors, local copies, and `lime train` / `lime eval` end to end on generated data."""

import csv
import json
import os
import subprocess
import sys

import av
import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lime import cli
from lime.data import (
    MultiModalCollator,
    MultiModalDataset,
    load_mmt47,
    load_video_frames,
    split_group,
    validate_split,
)
from lime.demo import write_demo_dataset
from lime.evaluation import answers_match, normalize_answer
from lime.tiny import build_tiny_llava_onevision, build_tiny_processor

MATCHES = [
    # (prediction, reference, match)
    ("Yes.", "yes", True), ("yes, it is", "yes", True), ("True", "yes", True), ("no", "false", True),
    ("yes", "duplicate", True), ("duplicate", "duplicate", True), ("no", "not_duplicate", True),
    ("not_duplicate", "duplicate", False), ("duplicate", "not_duplicate", False), ("not duplicate", "duplicate", False),
    ("not duplicate", "not_duplicate", True), ("unacceptable", "acceptable", False), ("acceptable", "unacceptable", False),
    ("acceptable.", "acceptable", True), ("yes", "unacceptable", False), ("no", "unacceptable", True),
    ("entailment", "yes", True), ("entailment", "duplicate", False), ("not_entailment", "no", True),
    ("equivalent", "not_equivalent", False), ("B", "b", True), ("(b)", "b", True), ("b. a cat", "b", True),
    ("The answer is C", "c", True), ("option d", "d", True), ("banana", "b", False), ("c", "b", False),
    ("3", "3", True), ("3.", "3", True), ("3.0", "3", True), ("three", "3", False), ("3.5", "3", False),
    ("2.90", "2.9", True), ("-1", "-1", True), ("12 apples", "12", True), ("21", "12", False),
    ("passion flower", "passion flower", True), ("a passion flower in bloom", "passion flower", True),
    ("passion fruit", "passion flower", False), ("red", "red", True), ("it is red", "red", True),
    ("not red", "red", False), ("reddish", "red", False), ("positive", "negative", False),
    ("<|im_end|>yes<|im_end|>", "yes", True), ("", "yes", False), ("  ", "no", False),
]


@pytest.mark.parametrize("prediction,reference,expected", MATCHES)
def test_answer_matching(prediction, reference, expected):
    matched, how = answers_match(prediction, reference)
    assert matched is expected, (prediction, reference, how)


def test_normalization():
    assert normalize_answer(" The CAT!! <|im_end|> ") == "the cat"
    assert normalize_answer("3...") == "3" and normalize_answer("not_duplicate") == "not_duplicate"
    assert normalize_answer("2.5") == "2.5"


def _video(path, frames, size=16):
    """Frame i is a solid frame of intensity 10 * i (within the codec's rounding)."""
    container = av.open(path, mode="w")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
    for i in range(frames):
        pixels = np.full((size, size, 3), 10 * i, dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def test_video_frames_are_sampled_uniformly_and_padded(tmp_path):
    long, short = str(tmp_path / "long.mp4"), str(tmp_path / "short.mp4")
    _video(long, 20)
    _video(short, 5)
    frames = load_video_frames(long, 8)
    assert frames.shape == (8, 16, 16, 3)
    levels = (frames.reshape(8, -1).mean(axis=1) / 10).round().astype(int).tolist()
    assert levels == np.linspace(0, 19, 8).round().astype(int).tolist()
    frames = load_video_frames(short, 8)
    levels = (frames.reshape(8, -1).mean(axis=1) / 10).round().astype(int).tolist()
    assert levels == [0, 1, 2, 3, 4, 4, 4, 4], "all five frames, then the last one repeated"
    with pytest.raises(ValueError, match="num_frames=0"):
        load_video_frames(long, 0)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mmt47")
    data_dir, root = write_demo_dataset(str(directory))
    return load_mmt47(data_dir), root


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_keeps_labels_on_the_answer_only(demo_data, padding_side):
    data, root = demo_data
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    split = data["train"]
    rows = [next(i for i in range(len(split)) if split[i]["source_type"] == kind) for kind in ("text", "image", "video")]
    dataset = MultiModalDataset(split, processor, root, num_video_frames=4, max_length=512)
    items = [dataset[i] for i in rows]
    batch = MultiModalCollator(processor, max_length=512, padding_side=padding_side)(items)
    length = batch["input_ids"].shape[1]
    for index, item in enumerate(items):
        answer_ids = tokenizer(split[rows[index]]["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        size = item["input_ids"].shape[0]
        start = length - size if padding_side == "left" else 0
        end = start + size
        expected = torch.full((length,), -100)
        expected[end - len(answer_ids):end] = torch.tensor(answer_ids)
        assert torch.equal(batch["labels"][index], expected)
        assert batch["attention_mask"][index].sum() == size
        assert torch.equal(batch["input_ids"][index][start:end], item["input_ids"])
        assert (batch["input_ids"][index][batch["attention_mask"][index] == 0] == tokenizer.pad_token_id).all()
    image_id, video_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<video>")
    assert not ((batch["input_ids"] == image_id) & (batch["labels"] != -100)).any()
    assert not ((batch["input_ids"] == video_id) & (batch["labels"] != -100)).any()
    assert batch["pixel_values"].shape[0] == 1 and batch["pixel_values_videos"].shape[:2] == (1, 4)
    assert batch["batch_num_images"].tolist() == [0, 1, 0]
    model, _ = build_tiny_llava_onevision()
    assert torch.isfinite(model(**batch).loss)


def _table(**columns):
    base = dict(source_type=["text", "text"], media_path=["", ""], question=["q1", "q2"], answer=["a", "b"])
    base.update(columns)
    return datasets.Dataset.from_dict(base)


def test_schema_errors_name_the_split_the_row_and_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"split 'train': missing column\(s\) \['answer'\]"):
        validate_split(_table().remove_columns("answer"), "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"split 'train' row 1: unknown source_type 'audio'"):
        validate_split(_table(source_type=["text", "audio"]), "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"row 0: media file not found: .*missing\.png"):
        validate_split(_table(source_type=["image", "text"], media_path=["missing.png", ""]), "x", str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"row 0: unreadable image file .*broken\.png"):
        validate_split(_table(source_type=["image", "text"], media_path=["broken.png", ""]), "x", str(tmp_path))
    with pytest.raises(ValueError, match=r"row 1: unreadable video file .*broken\.mp4"):
        validate_split(_table(source_type=["text", "video"], media_path=["", "broken.mp4"]), "x", str(tmp_path))
    with pytest.raises(ValueError, match=r"row 0: image row without a media_path"):
        validate_split(_table(source_type=["image", "text"]), "x", str(tmp_path))
    with pytest.raises(ValueError, match=r"row 1: empty question"):
        validate_split(_table(question=["q1", " "]), "x", str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    kept, skipped = validate_split(
        _table(source_type=["image", "audio"], media_path=["good.png", ""]), "x", str(tmp_path), skip_bad_rows=True)
    assert len(kept) == 1 and kept[0]["media_path"] == "good.png"
    assert [str(s) for s in skipped] == ["split 'x' row 1: unknown source_type 'audio' (expected one of ('text', 'image', 'video'))"]


def test_local_copies_as_data_files(tmp_path, demo_data):
    data, _ = demo_data
    parquet = tmp_path / "parquet" / "data"
    parquet.mkdir(parents=True)
    for name, split in data.items():
        split.to_parquet(str(parquet / f"{name}-00000-of-00001.parquet"))
    loaded = load_mmt47(str(tmp_path / "parquet"))
    assert sorted(loaded) == sorted(data) and loaded["glue_test_stsb"]["answer"] == data["glue_test_stsb"]["answer"]
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for name, split in data.items():
        split.to_json(str(jsonl / f"{name}.jsonl"))
    assert sorted(load_mmt47(str(jsonl))) == sorted(data)
    with pytest.raises(FileNotFoundError, match="no MMT-47 copy"):
        load_mmt47(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset_dict.json"):
        load_mmt47(str(tmp_path / "empty"))
    assert split_group("glue_test_stsb") == ("glue", "stsb") and split_group("train") is None


def test_cli_trains_saves_and_evaluates_end_to_end(tmp_path, capsys):
    model, processor = build_tiny_llava_onevision(seed=0)
    model_dir = str(tmp_path / "model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data_dir, root = write_demo_dataset(str(tmp_path / "data"))
    output = str(tmp_path / "run")
    assert cli.main(["train", "--model", model_dir, "--data", data_dir, "--data-root", root, "--output", output,
                     "--max-steps", "3", "--batch-size", "2", "--num-video-frames", "4", "--max-length", "512",
                     "--balance-every", "2", "--logging-steps", "1", "--save-steps", "1000"]) == 0
    assert os.path.isfile(os.path.join(output, "adapter", "adapter_config.json"))
    out = str(tmp_path / "eval")
    assert cli.main(["eval", "--model", model_dir, "--adapter", os.path.join(output, "adapter"), "--data", data_dir,
                     "--data-root", root, "--out", out, "--num-samples", "3", "--max-new-tokens", "3",
                     "--num-video-frames", "4", "--max-length", "512"]) == 0
    with open(os.path.join(out, "results.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    splits = [r["name"] for r in rows if r["level"] == "split"]
    assert sorted(splits) == sorted(n for n in load_mmt47(data_dir) if n != "train")
    assert {r["name"] for r in rows if r["level"] == "group"} == {"glue", "image", "text", "video"}
    assert [r["level"] for r in rows].count("overall") == 1
    assert all(r["samples"] == "3" for r in rows if r["level"] == "split")
    assert all(r["majority"] != "" for r in rows)  # beside every accuracy, the floor it is read against
    stsb = next(r for r in rows if r["name"] == "glue_test_stsb")
    assert stsb["parsed"] != "" and "pearson" in stsb
    summary = json.load(open(os.path.join(out, "results.json")))
    assert set(summary) == {"splits", "groups", "overall", "predictions", "skipped", "truncated"}
    assert summary["truncated"] == {"count": 0, "rows": {}}  # without --truncate no row is cut
    assert len(summary["predictions"]["image_test_color"]) == 3


def test_cli_errors_are_one_line(tmp_path):
    environment = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    result = subprocess.run([sys.executable, "-m", "lime", "eval", "--model", str(tmp_path / "no-model"), "--adapter",
                             str(tmp_path), "--data", str(tmp_path)], capture_output=True, text=True, env=environment)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("lime eval: error:")
    result = subprocess.run([sys.executable, "-m", "lime", "train", "--model", str(tmp_path), "--data", str(tmp_path),
                             "--peft", "qlora"], capture_output=True, text=True, env=environment)
    assert result.returncode == 2 and "invalid choice: 'qlora'" in result.stderr and "Traceback" not in result.stderr
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--moe-lr" in help_text and "--skip-bad-rows" in help_text


def test_cli_debug_after_the_subcommand_and_checks_before_the_model_loads(tmp_path):
    data_dir, root = write_demo_dataset(str(tmp_path / "data"))
    unloadable = str(tmp_path / "not-a-checkpoint")  # a directory, but loading it would fail
    os.makedirs(unloadable)
    base = ["train", "--model", unloadable, "--data", data_dir, "--data-root", root]
    # Checked before the model loads: the error names the option, not the checkpoint.
    with pytest.raises(cli.UserError, match="--resume"):
        cli.main(base + ["--resume", str(tmp_path / "no-checkpoint"), "--debug"])
    with pytest.raises(ValueError, match="top_k"):
        cli.main(["--debug"] + base + ["--num-experts", "2", "--top-k", "3"])
    with pytest.raises(ValueError, match="moe_lr"):
        cli.main(base + ["--debug", "--moe-lr", "0"])
    assert cli.main(base + ["--num-experts", "2", "--top-k", "3"]) == 2  # without --debug: the one-line error
    for option, name in (("--num-video-frames", "num_video_frames"), ("--max-length", "max_length")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer; got {name}=0"):
            cli.main(base + [option, "0", "--debug"])
    evaluate = ["eval", "--model", unloadable, "--adapter", str(tmp_path), "--data", data_dir, "--data-root", root]
    for option, name in (("--batch-size", "batch_size"), ("--max-new-tokens", "max_new_tokens"),
                         ("--num-samples", "num_samples_per_split"), ("--num-video-frames", "num_video_frames"),
                         ("--max-length", "max_length")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer; got {name}=0"):
            cli.main(evaluate + [option, "0", "--debug"])
    parser = cli.build_parser()
    assert parser.parse_args(["--debug", "demo"]).debug and parser.parse_args(["demo", "--debug"]).debug
    assert not parser.parse_args(["demo"]).debug


def test_a_split_whose_rows_were_all_skipped_has_no_accuracy_and_leaves_the_means(tmp_path):
    from lime.evaluation import run_full_evaluation

    data_dir, root = write_demo_dataset(str(tmp_path / "data"))
    data = load_mmt47(data_dir)
    broken = data["image_test_color"].map(lambda row: {"media_path": "images/missing.png"})
    data = datasets.DatasetDict({"image_test_color": broken, "text_test_clue": data["text_test_clue"]})
    model, processor = build_tiny_llava_onevision(seed=0)
    summary = run_full_evaluation(model, processor, data, root, num_samples_per_split=2, max_new_tokens=2,
                                  max_length=512, skip_bad_rows=True, save_json=str(tmp_path / "results.json"))
    image, text = summary["splits"]["image_test_color"], summary["splits"]["text_test_clue"]
    assert image["samples"] == 0 and np.isnan(image["accuracy"]) and np.isnan(summary["groups"]["image"]["accuracy"])
    assert text["samples"] == 2 and summary["overall"]["accuracy"] == text["accuracy"]
    assert len(summary["skipped"]) == 2
    written = json.load(open(tmp_path / "results.json"))
    assert written["splits"]["image_test_color"]["accuracy"] is None


def test_the_majority_rate_is_the_accuracy_of_always_giving_the_most_common_answer():
    from lime.evaluation import majority_rate

    assert majority_rate(["yes", "no", "yes", "yes"]) == 0.75
    assert majority_rate(["a", "b"]) == 0.5 and majority_rate(["3.0", "3", "3"]) == 2 / 3  # answers as written
    assert np.isnan(majority_rate([]))
