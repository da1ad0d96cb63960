"""The original LiME code's inputs where they differ from this project's (issue 28, part 3): its single-tile
image settings, floored video frame indices and the truncation of over-long rows; each as a library option
and a `lime train` / `lime eval` flag."""

import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

import lime.data
from lime import cli
from lime.data import MultiModalCollator, MultiModalDataset, frame_indices, load_video_frames
from lime.demo import write_demo_dataset
from lime.inputs import use_original_image_settings
from lime.tiny import CHAT_TEMPLATE, build_tiny_llava_onevision, build_tiny_processor, build_tiny_tokenizer
from test_mmt47 import _video  # a video of known frames


# ----------------------------------------------------------------------------------------- video frames

def test_frame_indices_round_and_floor():
    # Ten frames, eight wanted: positions 0, 9/7, 18/7, ..., 9 = 0, 1.29, 2.57, 3.86, 5.14, 6.43, 7.71, 9.
    assert frame_indices(10, 8, "round") == [0, 1, 3, 4, 5, 6, 8, 9]
    assert frame_indices(10, 8, "floor") == [0, 1, 2, 3, 5, 6, 7, 9]
    # Twenty frames: 0, 2.71, 5.43, 8.14, 10.86, 13.57, 16.29, 19.
    assert frame_indices(20, 8, "round") == [0, 3, 5, 8, 11, 14, 16, 19]
    assert frame_indices(20, 8, "floor") == [0, 2, 5, 8, 10, 13, 16, 19]
    assert frame_indices(20, 8) == frame_indices(20, 8, "round"), "round is the default"
    # Fewer frames than wanted: each once (load_video_frames pads with the last); one frame: frame 0.
    assert frame_indices(5, 8, "floor") == frame_indices(5, 8, "round") == [0, 1, 2, 3, 4]
    assert frame_indices(1, 8, "floor") == [0]
    # floor is the original's integer linspace, for every length up to 300 frames.
    for total in range(1, 301):
        assert frame_indices(total, 8, "floor") == np.linspace(0, total - 1, min(8, total), dtype=int).tolist()
    with pytest.raises(ValueError, match=r"frame_rounding must be one of \('round', 'floor'\); got frame_rounding='ceil'"):
        frame_indices(10, 8, "ceil")


def _levels(frames):
    return (frames.reshape(frames.shape[0], -1).mean(axis=1) / 10).round().astype(int).tolist()


def test_video_frames_floored_through_the_dataset(tmp_path):
    _video(str(tmp_path / "clip.mp4"), 20)
    path = str(tmp_path / "clip.mp4")
    assert _levels(load_video_frames(path, 8, "floor")) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert _levels(load_video_frames(path, 8, "round")) == [0, 3, 5, 8, 11, 14, 16, 19]
    with pytest.raises(ValueError, match="got frame_rounding='nearest'"):
        load_video_frames(path, 8, "nearest")

    processor = build_tiny_processor()
    rows = datasets.Dataset.from_dict({"source_type": ["video"], "media_path": ["clip.mp4"],
                                       "question": ["What moves?"], "answer": ["still"]})
    pixels = {}
    for rounding in ("round", "floor"):
        item = MultiModalDataset(rows, processor, str(tmp_path), num_video_frames=8, frame_rounding=rounding)[0]
        expected = processor.video_processor(videos=[load_video_frames(path, 8, rounding)], return_tensors="pt")
        assert torch.equal(item["pixel_values_videos"], expected["pixel_values_videos"][0])
        pixels[rounding] = item["pixel_values_videos"]
    assert not torch.equal(pixels["round"], pixels["floor"]), "four of the eight frames differ"
    with pytest.raises(ValueError, match="got frame_rounding='ceil'"):
        MultiModalDataset(rows, processor, str(tmp_path), frame_rounding="ceil")


# ----------------------------------------------------------------------------------------- image settings

def _image_tokens(processor, height, width):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = processor(text=[text], images=[Image.new("RGB", (width, height))], return_tensors="pt")
    return int((batch["input_ids"] == processor.image_token_id).sum()), batch


def test_original_image_settings_on_the_tiny_model():
    """The tiny tower sees 32x32 crops in 4x4 patches of 8 (16 tokens a crop); its checkpoint grids are
    32x32, 32x64, 64x32 and 64x64. A 64x64 image: stock, a 2x2 grid of crops, 8x8 tokens + 8 row ends + the
    16 of the overview = 88; original, one crop: 4x4 + 4 + 16 = 36. A 32x64 image (h x w): stock, the 32x64
    grid, 4x8 + 4 + 16 = 52; original, one crop of which the image fills 2 rows: 2x4 + 2 + 16 = 26."""
    model, processor = build_tiny_llava_onevision()
    assert _image_tokens(processor, 64, 64)[0] == 88 and _image_tokens(processor, 32, 64)[0] == 52
    assert _image_tokens(processor, 64, 64)[1]["pixel_values"].shape[1] == 5  # the overview and four crops
    settings = use_original_image_settings(processor, model.config)
    assert settings == {"image_grid_pinpoints": [[32, 32]], "image_size": 32}
    assert processor.image_processor.image_grid_pinpoints == [[32, 32]] and model.config.image_grid_pinpoints == [[32, 32]]
    assert (processor.image_processor.size.height, processor.image_processor.size.width) == (32, 32)
    count, batch = _image_tokens(processor, 64, 64)
    assert count == 36 and _image_tokens(processor, 32, 64)[0] == 26
    assert batch["pixel_values"].shape[1] == 2  # the overview and one crop
    # The model reads one crop's features: placeholders and features agree, a forward pass runs.
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    # Set on the processor alone, the model's config still expects the stock grids: the counts disagree.
    stock_model, half_set = build_tiny_llava_onevision()
    half_set.image_processor.image_grid_pinpoints = [[32, 32]]
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            stock_model(**_image_tokens(half_set, 64, 64)[1])


def _real_sized_processor():
    """LLaVA-OneVision's image processor as released (the class defaults: 384x384, the 36 grids) with
    SigLIP-so400m's 27x27 patches of a 384 tile (patch 14): 729 tokens a crop."""
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(), tokenizer=build_tiny_tokenizer(),
        video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=(384 // 14) ** 2,
        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)


# (height, width): ((stock crops, tokens), (original crops, tokens)), as README.md's table states them.
REAL_SIZED_COUNTS = {(384, 384): ((2, 1485), (2, 1485)), (480, 640): ((5, 2929), (2, 1317)),
                     (1024, 768): ((7, 4744), (2, 1323)), (720, 1280): ((9, 5967), (2, 1149)),
                     (1080, 1920): ((16, 7269), (2, 1149))}


def _crops_and_tokens(processor, height, width):
    count, batch = _image_tokens(processor, height, width)
    return batch["pixel_values"].shape[1], count


def test_token_counts_of_a_real_sized_llava_onevision():
    processor = _real_sized_processor()
    assert len(processor.image_processor.image_grid_pinpoints) == 36
    stock = {size: _crops_and_tokens(processor, *size) for size in REAL_SIZED_COUNTS}
    # The largest count README.md quotes (found by a search over heights and widths 16 to 2384, steps of 16).
    assert _image_tokens(processor, 1168, 960)[0] == 8765
    video = processor(text=["<video>"], videos=[np.zeros((8, 64, 64, 3), dtype=np.uint8)], return_tensors="pt")
    assert int((video["input_ids"] == processor.video_token_id).sum()) == 8 * 14 * 14 + 1 == 1569
    vision = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(vocab_size=64, hidden_size=32),
                                  vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)
    assert use_original_image_settings(processor, config) == {"image_grid_pinpoints": [[384, 384]], "image_size": 384}
    assert config.image_grid_pinpoints == [[384, 384]]
    original = {size: _crops_and_tokens(processor, *size) for size in REAL_SIZED_COUNTS}
    assert {size: (stock[size], original[size]) for size in REAL_SIZED_COUNTS} == REAL_SIZED_COUNTS
    # The bounds: one 27x27 tile of which the image fills 1 to 27 rows, its row ends, and the overview's 729.
    assert _image_tokens(processor, 16, 224)[0] == 27 * 1 + 1 + 729 == 757
    assert _image_tokens(processor, 16, 16)[0] == 27 * 27 + 27 + 729 == 1485
    video = processor(text=["<video>"], videos=[np.zeros((8, 64, 64, 3), dtype=np.uint8)], return_tensors="pt")
    assert int((video["input_ids"] == processor.video_token_id).sum()) == 1569, "videos are not affected"
    # Every image is now two 384x384 crops (the overview and one tile), as the model config reads them.
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
    assert _image_tokens(processor, 1080, 1920)[1]["pixel_values"].shape[1:] == (2, 3, 384, 384)
    assert image_size_to_num_patches((1080, 1920), config.image_grid_pinpoints, 384) == 2


def test_original_image_settings_refuse_other_models():
    config = Qwen2Config(vocab_size=64, hidden_size=32)
    with pytest.raises(ValueError, match="for LLaVA-OneVision; got a model of type 'qwen2'.*--stock-processor"):
        use_original_image_settings(build_tiny_processor(), config)
    _, processor = build_tiny_llava_onevision()
    model_config = build_tiny_llava_onevision()[0].config
    with pytest.raises(ValueError, match="no image processor with image_grid_pinpoints"):
        use_original_image_settings(processor.tokenizer, model_config)


# ----------------------------------------------------------------------------------------- truncation

LONG_QUESTION = "Describe what is shown in the picture " * 12 + "and answer with the colour"


@pytest.fixture()
def long_rows(tmp_path):
    Image.new("RGB", (32, 32), (200, 20, 20)).save(tmp_path / "red.png")
    rows = datasets.Dataset.from_dict({
        "source_type": ["image", "text", "image"], "media_path": ["red.png", "", "red.png"],
        "question": [LONG_QUESTION, LONG_QUESTION, "What colour?"], "answer": ["red", "yes", "red"]})
    return rows, str(tmp_path)


def _placeholders(processor, ids):
    return int(torch.isin(ids, torch.tensor([processor.image_token_id, processor.video_token_id])).sum())


def test_over_long_rows_are_an_error_unless_truncated(long_rows):
    rows, root = long_rows
    processor = build_tiny_processor()
    full = MultiModalDataset(rows, processor, root, max_length=4096)[0]["input_ids"].shape[0]
    with pytest.raises(ValueError, match=rf"split 'train' row 0: {full} tokens exceed max_length=60 .*--truncate"):
        MultiModalDataset(rows, processor, root, max_length=60)[0]
    with pytest.raises(ValueError, match=r"truncate must be None .* one of \('question', 'tail'\); got truncate='middle'"):
        MultiModalDataset(rows, processor, root, truncate="middle")


@pytest.mark.parametrize("with_answer", [True, False])
def test_truncate_question_keeps_media_prompt_end_and_answer(long_rows, with_answer):
    rows, root = long_rows
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    whole = MultiModalDataset(rows, processor, root, max_length=4096, with_answer=with_answer)
    cut = MultiModalDataset(rows, processor, root, max_length=60, with_answer=with_answer, truncate="question")
    end = tokenizer("<|im_end|>\n<|im_start|>assistant\n" + ("red<|im_end|>" if with_answer else ""),
                    add_special_tokens=False)["input_ids"]
    for row in (0, 1):
        full, item = whole[row], cut[row]
        ids = item["input_ids"]
        assert full["input_ids"].shape[0] > 60 and ids.shape[0] == 60
        assert _placeholders(processor, ids) == _placeholders(processor, full["input_ids"])
        assert ids[-len(end):].tolist() == end or row == 1  # row 1's answer is "yes"
        kept_end = len(end) if row == 0 else len(tokenizer("<|im_end|>\n<|im_start|>assistant\n"
                                                          + ("yes<|im_end|>" if with_answer else ""),
                                                          add_special_tokens=False)["input_ids"])
        assert torch.equal(ids[:60 - kept_end], full["input_ids"][:60 - kept_end]), "the question's start kept"
        assert torch.equal(ids[60 - kept_end:], full["input_ids"][-kept_end:]), "the prompt's end (and answer) kept"
        if with_answer:
            assert torch.equal(item["labels"][item["labels"] != -100], full["labels"][full["labels"] != -100])
    assert cut.truncated == {0: whole[0]["input_ids"].shape[0], 1: whole[1]["input_ids"].shape[0]}
    assert cut.answer_lost == set()
    short = cut[2]  # not over-long: untouched, not recorded
    assert torch.equal(short["input_ids"], whole[2]["input_ids"]) and 2 not in cut.truncated
    # A training batch of cut rows runs through the model: the image's placeholders still match its features.
    if with_answer:
        model, _ = build_tiny_llava_onevision()
        batch = MultiModalCollator(processor, max_length=60)([cut[0], cut[1], cut[2]])
        with torch.no_grad():
            assert torch.isfinite(model(**batch).loss)


def test_truncate_tail_keeps_the_first_tokens_as_the_original(long_rows):
    rows, root = long_rows
    processor = build_tiny_processor()
    whole = MultiModalDataset(rows, processor, root, max_length=4096)
    cut = MultiModalDataset(rows, processor, root, max_length=60, truncate="tail")
    for row in (0, 1):
        full, item = whole[row], cut[row]
        assert torch.equal(item["input_ids"], full["input_ids"][:60])
        assert torch.equal(item["labels"], full["labels"][:60])
        assert (item["labels"] == -100).all(), "the answer sat past token 60: the row keeps no labelled token"
    assert sorted(cut.truncated) == [0, 1] and cut.answer_lost == {0, 1}
    # Cut just before the answer's last token: part of it stays labelled, the row is not in answer_lost.
    length = whole[1]["input_ids"].shape[0]
    partial = MultiModalDataset(rows, processor, root, max_length=length - 1, truncate="tail")
    assert (partial[1]["labels"] != -100).sum() == (whole[1]["labels"] != -100).sum() - 1
    assert partial.answer_lost == set() and list(partial.truncated) == [1]
    # At generation the tail cut drops the assistant header, as the original's does.
    prompts = MultiModalDataset(rows, processor, root, max_length=60, with_answer=False, truncate="tail")
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert prompts[0]["input_ids"][-len(header):].tolist() != header


def test_truncation_never_cuts_image_placeholders(long_rows):
    rows, root = long_rows
    processor = build_tiny_processor()
    ids = MultiModalDataset(rows, processor, root, max_length=4096)[0]["input_ids"]
    media_end = int(torch.isin(ids, torch.tensor([processor.image_token_id])).nonzero().max()) + 1
    for mode in ("question", "tail"):
        too_short = MultiModalDataset(rows, processor, root, max_length=media_end - 1, truncate=mode)
        with pytest.raises(ValueError, match=rf"split 'train' row 0: {ids.shape[0]} tokens cannot be cut to "
                                             rf"max_length={media_end - 1}: it must keep the first {media_end} tokens"):
            too_short[0]
        assert too_short.truncated == {}
    # "tail" fits exactly the placeholders; "question" also needs the prompt's end and the answer.
    assert MultiModalDataset(rows, processor, root, max_length=media_end, truncate="tail")[0]["input_ids"].shape[0] == media_end
    after = processor.tokenizer("<|im_end|>\n<|im_start|>assistant\nred<|im_end|>", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=f"and the {len(after)} tokens after the question; raise --max-length"):
        MultiModalDataset(rows, processor, root, max_length=media_end, truncate="question")[0]


# ----------------------------------------------------------------------------------------- the command line

def test_cli_flags_parse():
    parser = cli.build_parser()
    base = ["--model", "m", "--data", "d"]
    for command in (["train"], ["eval", "--adapter", "a"]):
        args = parser.parse_args(command + base)
        assert (args.stock_processor, args.frame_sampling, args.truncate) == (False, None, None)
        # No --frame-sampling: rounded, floored under compat original (the original's).
        assert (cli._frame_sampling(args, "lime"), cli._frame_sampling(args, "original")) == ("round", "floor")
        args = parser.parse_args(command + base + ["--stock-processor", "--frame-sampling", "floor", "--truncate"])
        assert (args.stock_processor, args.frame_sampling, args.truncate) == (True, "floor", "question")
        args = parser.parse_args(command + base + ["--frame-sampling", "round"])
        assert cli._frame_sampling(args, "original") == "round"
        assert parser.parse_args(command + base + ["--truncate", "tail", "--max-length", "9"]).truncate == "tail"
        for bad in (["--frame-sampling", "ceil"], ["--truncate", "middle"]):
            with pytest.raises(SystemExit):
                parser.parse_args(command + base + bad)
    args = parser.parse_args(["train"] + base + ["--compat", "original"])
    assert (args.compat, args.router, args.ngram_mode) == ("original", None, None)
    assert parser.parse_args(["train"] + base).compat == "lime"
    with pytest.raises(SystemExit):
        parser.parse_args(["train"] + base + ["--compat", "paper"])


def test_cli_loads_the_original_image_settings_unless_stock(model_dir, capsys):
    model, processor = cli._load_model(model_dir, "float32")
    assert processor.image_processor.image_grid_pinpoints == [[32, 32]] and model.config.image_grid_pinpoints == [[32, 32]]
    assert "the original LiME code's settings, image_grid_pinpoints [[32, 32]]" in capsys.readouterr().out
    model, processor = cli._load_model(model_dir, "float32", stock_processor=True)
    stock = [[32, 32], [32, 64], [64, 32], [64, 64]]
    assert processor.image_processor.image_grid_pinpoints == stock and model.config.image_grid_pinpoints == stock
    assert "--stock-processor" in capsys.readouterr().out


def test_cli_truncates_counts_and_floors(model_dir, tmp_path, capsys, monkeypatch):
    """`lime train` / `lime eval` with --truncate and --frame-sampling floor on the demo's data, whose rows
    (33 to 72 tokens, placeholders ending by token 39) partly exceed --max-length 50."""
    roundings = []
    load = lime.data.load_video_frames

    def recording(path, num_frames, frame_rounding="round"):
        roundings.append(frame_rounding)
        return load(path, num_frames, frame_rounding)

    monkeypatch.setattr(lime.data, "load_video_frames", recording)
    data_dir, root = write_demo_dataset(str(tmp_path / "data"))
    common = ["--model", model_dir, "--data", data_dir, "--data-root", root, "--num-video-frames", "4",
              "--max-length", "50", "--frame-sampling", "floor"]
    output = str(tmp_path / "run")
    assert cli.main(["train", *common, "--truncate", "--output", output, "--max-steps", "4", "--batch-size", "4",
                     "--save-steps", "1000", "--balance-every", "2"]) == 0
    printed = capsys.readouterr().out
    assert "truncated " in printed and "over-long row(s) to --max-length 50 (--truncate question): split 'train' rows" in printed
    assert "kept no answer token" not in printed
    evaluate = ["eval", *common, "--adapter", os.path.join(output, "adapter"), "--num-samples", "4",
                "--max-new-tokens", "2", "--batch-size", "4"]
    with pytest.raises(RuntimeError, match=r"split 'image_test_color' row 0: 70 tokens exceed max_length=50 \(raise "
                                           r"--max-length, or cut over-long rows with --truncate\)"):
        cli.main([*evaluate, "--out", str(tmp_path / "fails")])
    capsys.readouterr()
    out = str(tmp_path / "eval")
    assert cli.main([*evaluate, "--truncate", "--out", out]) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "results.json")))
    truncated = summary["truncated"]
    # Over 50 tokens at generation: the image (70) and video (53) prompts, and STS-B's longer pairs.
    assert truncated["rows"]["image_test_color"] == [0, 1, 2, 3] and truncated["rows"]["video_test_color"] == [0, 1, 2, 3]
    assert "text_test_clue" not in truncated["rows"] and "glue_test_sst2" not in truncated["rows"]
    assert truncated["count"] == sum(len(rows) for rows in truncated["rows"].values()) >= 8
    assert f"truncated {truncated['count']} over-long row(s) to --max-length 50 (--truncate question)" in printed
    assert roundings and set(roundings) == {"floor"}
