"""MMT-47: loading a local copy, validating it, and turning rows into LLaVA-OneVision batches.

A row has `source_type` (text | image | video), `media_path` (relative to `data_root`; empty for
text), `question` and `answer`. Splits: `train`, and test splits named `<group>_test_<task>` with
group image, text, glue or video. Every problem is an error that names the split, the row and the
path, unless `skip_bad_rows` is asked for: then the bad rows are dropped, counted and listed.

The inputs can follow the original LiME code where it differs from this project's defaults (see
`lime.inputs`): `use_original_image_settings` (one image tile at the vision tower's resolution, 384
for the released LLaVA-OneVision checkpoints), `frame_rounding="floor"` (video frame indices floored,
not rounded) and `truncate` (over-long rows cut instead of an error).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import av
import datasets
import numpy as np
import torch
from PIL import Image

from lime_kernels.options import positive_integer

from .inputs import (FRAME_ROUNDINGS, TRUNCATIONS, check_frame_rounding, check_truncation,  # noqa: F401 (re-exported)
                     use_original_image_settings)

REQUIRED_COLUMNS = ("source_type", "media_path", "question", "answer")
SOURCE_TYPES = ("text", "image", "video")
TEST_SPLIT = re.compile(r"^(image|text|glue|video)_test_(.+)$")


DATA_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def _split_files(path: str) -> Tuple[str, Dict[str, List[str]]]:
    """Data files under `path` by split: the split is the file name without its shard suffix
    (`data/glue_test_stsb-00000-of-00001.parquet`, `train.jsonl`, ...)."""
    found: Dict[str, List[str]] = {}
    formats = set()
    for directory, _, files in os.walk(path):
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if extension in DATA_FORMATS:
                formats.add(DATA_FORMATS[extension])
                found.setdefault(SHARD_SUFFIX.sub("", stem), []).append(os.path.join(directory, name))
    if not found:
        raise FileNotFoundError(f"no MMT-47 copy at {path}: no dataset_dict.json (save_to_disk) and no "
                                f"{'/'.join(sorted(DATA_FORMATS))} data files")
    if len(formats) > 1:
        raise ValueError(f"{path} mixes data file formats {sorted(formats)}; keep one")
    return formats.pop(), found


def _check_data_file(path: str, data_format: str) -> None:
    """An empty file, or a text file (json, csv) that is not UTF-8, is a ValueError naming the file (the
    loader's own errors name neither file nor line)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty data file (its split would have no rows)")
    if data_format == "parquet":
        return
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path} line {number}: not UTF-8 text (byte {line[error.start]:#04x} at column "
                                 f"{error.start + 1}); re-save the file as UTF-8") from None


def load_mmt47(path: str) -> datasets.DatasetDict:
    """A local MMT-47 copy: a `save_to_disk` directory, or a directory of data files (parquet, json,
    jsonl or csv) named by split, such as a download of the dataset repository."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no MMT-47 copy at {path} (not a directory)")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return datasets.load_from_disk(path)
    data_format, files = _split_files(path)
    for paths in files.values():
        for file in paths:
            _check_data_file(file, data_format)
    return datasets.load_dataset(data_format, data_files=files)


def split_group(split: str) -> Optional[Tuple[str, str]]:
    """(group, task) of a test split name such as 'glue_test_stsb', else None."""
    match = TEST_SPLIT.match(split)
    return (match.group(1), match.group(2)) if match else None


def test_splits(data: datasets.DatasetDict) -> List[str]:
    return [name for name in data if split_group(name) is not None]


@dataclass(frozen=True)
class BadRow:
    split: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"split {self.split!r} row {self.row}: {self.reason}"


def _media_problem(source_type: str, media_path, data_root: str) -> Optional[str]:
    if source_type == "text":
        return None
    if not isinstance(media_path, str) or not media_path:
        return f"{source_type} row without a media_path"
    path = os.path.join(data_root, media_path)
    if not os.path.isfile(path):
        return f"media file not found: {path}"
    try:
        if source_type == "image":
            with Image.open(path) as image:
                image.verify()
        else:
            with av.open(path) as container:
                if not container.streams.video:
                    return f"no video stream in {path}"
                if next(container.decode(video=0), None) is None:  # decoding stops at the first frame
                    return f"no frame in the video {path}"
    except (OSError, ValueError, av.error.FFmpegError) as error:  # unreadable: reported, never ignored
        return f"unreadable {source_type} file {path}: {error}"
    return None


def check_columns(dataset: datasets.Dataset, split: str) -> None:
    """A ValueError naming the split unless it has rows and every required column, with values."""
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(f"split {split!r}: missing column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} has no rows")
    # Data files loaded together share their columns: one missing from a split's file reads as all null.
    absent = [column for column in REQUIRED_COLUMNS if all(value is None for value in dataset[column])]
    if absent:
        raise ValueError(f"split {split!r}: column(s) {absent} hold no value in any row (missing from its data "
                         f"file?); every row needs {list(REQUIRED_COLUMNS)}")


def validate_split(dataset: datasets.Dataset, split: str, data_root: str,
                   skip_bad_rows: bool = False) -> Tuple[datasets.Dataset, List[BadRow]]:
    """Check columns, source types and media files. Returns (the dataset, the rows skipped).

    Missing columns and an empty split are always an error (`check_columns`); bad rows are one, listing
    them, unless `skip_bad_rows`.
    """
    check_columns(dataset, split)
    bad: List[BadRow] = []
    columns = zip(dataset["source_type"], dataset["media_path"], dataset["question"], dataset["answer"])
    for row, (source_type, media_path, question, answer) in enumerate(columns):
        if source_type not in SOURCE_TYPES:
            bad.append(BadRow(split, row, f"unknown source_type {source_type!r} (expected one of {SOURCE_TYPES})"))
            continue
        if not isinstance(question, str) or not question.strip():
            bad.append(BadRow(split, row, "empty question"))
            continue
        if answer is None or not str(answer).strip():
            bad.append(BadRow(split, row, "empty answer"))
            continue
        problem = _media_problem(source_type, media_path, data_root)
        if problem is not None:
            bad.append(BadRow(split, row, problem))
    if bad and not skip_bad_rows:
        listed = "; ".join(str(b) for b in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{len(bad)} bad row(s): {listed}{more}. Fix them, or skip them with --skip-bad-rows")
    if bad:
        dropped = {b.row for b in bad}
        dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    return dataset, bad


def frame_indices(total: int, num_frames: int, frame_rounding: str = "round") -> List[int]:
    """The indices of `min(num_frames, total)` frames spread evenly from the first frame to the last
    of a video of `total` frames: the fractional positions rounded to the nearest frame ("round", half
    to even as NumPy rounds) or floored ("floor", as the original LiME code's integer linspace does).
    Ten frames, eight wanted: round gives [0, 1, 3, 4, 5, 6, 8, 9], floor [0, 1, 2, 3, 5, 6, 7, 9]."""
    check_frame_rounding(frame_rounding)
    total = positive_integer("total", total)
    num_frames = positive_integer("num_frames", num_frames)
    positions = np.linspace(0, total - 1, min(num_frames, total))
    picked = positions.round() if frame_rounding == "round" else np.floor(positions)
    return picked.astype(int).tolist()


def load_video_frames(path: str, num_frames: int, frame_rounding: str = "round") -> np.ndarray:
    """`num_frames` RGB frames `(num_frames, H, W, 3)` sampled uniformly over the video (`frame_indices`
    with `frame_rounding`); a video with fewer frames is padded by repeating its last frame."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1; got num_frames={num_frames}")
    check_frame_rounding(frame_rounding)
    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no frame decoded from {path}")
    indices = frame_indices(len(frames), num_frames, frame_rounding)
    chosen = [frames[i] for i in indices] + [frames[-1]] * (num_frames - len(indices))
    return np.stack(chosen)


def conversation(source_type: str, question: str, answer: Optional[str] = None) -> List[Dict]:
    """The chat-template conversation of a row: media placeholder first, then the question."""
    user = ([{"type": source_type}] if source_type != "text" else []) + [{"type": "text", "text": question}]
    turns = [{"role": "user", "content": user}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": str(answer)}]})
    return turns


class MultiModalDataset(torch.utils.data.Dataset):
    """MMT-47 rows as processed LLaVA-OneVision samples with answer-only labels.

    The sequence is the chat template's generation prompt (the user turn, then the assistant
    header) followed by the answer and the end-of-turn token: training sees exactly the prompt
    generation will see (LLaVA-OneVision's template renders a finished assistant turn differently
    from its generation prompt). Each item: `input_ids`, `labels` (-100 everywhere but the answer and
    the end-of-turn token), `pixel_values` / `image_sizes` (images) or `pixel_values_videos` (videos).
    With `with_answer=False` the item is the prompt alone (for generation) plus its `answer`.

    Video frames are picked by `frame_indices` with `frame_rounding` ("round" or "floor"). A row longer
    than `max_length` tokens is an error naming it, unless `truncate` names a cut (`TRUNCATIONS`):

    - "question": the end of the question is cut; the image or video placeholders, the end of the
      prompt (the template's end of turn and assistant header) and the whole answer are kept, so a cut
      training row still learns its answer and a cut prompt still asks for one.
    - "tail": the first `max_length` tokens are kept, as the original LiME code does (its processor
      truncates on the right): the answer, and at generation the assistant header, can be cut; a
      training row cut before its answer has no labelled token.

    Either way placeholders are never cut (they must match the image's features): a row whose
    placeholders reach past what the cut keeps is an error naming it. Cut rows are recorded in
    `truncated` (row -> its length before the cut) and, among them, rows left without a labelled token
    in `answer_lost` (only "tail" can do that), in the process that read them (the CLI's data loader
    reads in the main process).
    """

    def __init__(self, dataset, processor, data_root: str = "", num_video_frames: int = 8, max_length: int = 2048,
                 with_answer: bool = True, split: str = "train", frame_rounding: str = "round",
                 truncate: Optional[str] = None):
        num_video_frames = positive_integer("num_video_frames", num_video_frames)
        max_length = positive_integer("max_length", max_length)
        self.dataset = dataset
        self.processor = processor
        self.data_root = data_root
        self.num_video_frames = num_video_frames
        self.max_length = max_length
        self.with_answer = with_answer
        self.split = split
        self.frame_rounding = check_frame_rounding(frame_rounding)
        self.truncate = check_truncation(truncate)
        self.truncated: Dict[int, int] = {}
        self.answer_lost: set = set()
        if processor.tokenizer.eos_token is None:
            raise ValueError("the processor's tokenizer has no eos_token to end the answers with")

    def __len__(self) -> int:
        return len(self.dataset)

    def _media(self, row: Dict):
        path = os.path.join(self.data_root, row["media_path"] or "")
        if row["source_type"] == "image":
            with Image.open(path) as image:
                return {"images": [image.convert("RGB")]}
        if row["source_type"] == "video":
            return {"videos": [load_video_frames(path, self.num_video_frames, self.frame_rounding)]}
        return {}

    def __getitem__(self, index: int) -> Dict:
        row = self.dataset[index]
        source_type = row["source_type"]
        if source_type not in SOURCE_TYPES:
            raise ValueError(f"split {self.split!r} row {index}: unknown source_type {source_type!r}")
        answer = str(row["answer"])
        prompt = self.processor.apply_chat_template(conversation(source_type, row["question"]), add_generation_prompt=True)
        text = prompt + (answer + self.processor.tokenizer.eos_token if self.with_answer else "")
        try:
            media = self._media(row)
        except (OSError, ValueError, av.error.FFmpegError) as error:  # a file changed since validation
            raise ValueError(f"split {self.split!r} row {index}: {error}") from error
        processed = self.processor(text=[text], return_tensors="pt", **media)
        input_ids = processed["input_ids"][0]
        labels = self._answer_labels(answer, input_ids, index) if self.with_answer else None
        if input_ids.shape[0] > self.max_length:
            if self.truncate is None:
                raise ValueError(
                    f"split {self.split!r} row {index}: {input_ids.shape[0]} tokens exceed max_length={self.max_length} "
                    f"(raise --max-length, or cut over-long rows with --truncate)"
                )
            input_ids, labels = self._cut(input_ids, labels, prompt, row["question"], index)
        item = {"input_ids": input_ids, "source_type": source_type, "answer": answer, "row": index}
        for key in ("pixel_values", "image_sizes", "pixel_values_videos"):
            if key in processed:
                item[key] = processed[key][0]
        if labels is not None:
            item["labels"] = labels
        return item

    def _cut(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor], prompt: str, question: str,
             index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`input_ids` (and `labels`) cut to `max_length` tokens as `truncate` says; the cut is recorded."""
        where = f"split {self.split!r} row {index}"
        length = input_ids.shape[0]
        kept_end = 0  # tokens kept at the end: none for "tail"; for "question" the prompt's end (and answer)
        if self.truncate == "question":
            kept_end = len(self._tokens_after_question(prompt, question, input_ids, labels, where))
        head = self.max_length - kept_end  # tokens kept from the start
        placeholders = torch.isin(input_ids, torch.tensor([self.processor.image_token_id, self.processor.video_token_id]))
        media_end = int(placeholders.nonzero().max()) + 1 if placeholders.any() else 0
        if head < media_end or head < 1:
            kept = f" and the {kept_end} tokens after the question" if kept_end else ""
            raise ValueError(f"{where}: {length} tokens cannot be cut to max_length={self.max_length}: it must keep "
                             f"the first {media_end} tokens (up to the end of the image/video placeholders, which are "
                             f"never cut){kept}; raise --max-length")
        pick = torch.cat([torch.arange(head), torch.arange(length - kept_end, length)])
        input_ids = input_ids[pick]
        if labels is not None:
            labels = labels[pick]
            if bool((labels == -100).all()):
                self.answer_lost.add(index)
        self.truncated[index] = length
        return input_ids, labels

    def _tokens_after_question(self, prompt: str, question: str, input_ids: torch.Tensor,
                               labels: Optional[torch.Tensor], where: str) -> List[int]:
        """The sequence's tokens after the question: the prompt's end (the text after the question's last
        occurrence in the prompt, surrounding whitespace aside), then (training) the answer and the
        end-of-turn token, checked in place."""
        question = question.strip()
        start = prompt.rfind(question)
        if start < 0:
            raise ValueError(f"{where}: the question does not appear as written in the chat template's prompt, so its "
                             f"end cannot be cut (truncate='tail' keeps the first max_length tokens instead)")
        ids = self.processor.tokenizer(prompt[start + len(question):], add_special_tokens=False)["input_ids"]
        if labels is not None:
            ids += input_ids[labels != -100].tolist()  # the answer and end-of-turn token: the trailing labels
        if not ids or input_ids[-len(ids):].tolist() != ids:
            raise ValueError(f"{where}: cannot locate the end of the prompt in the tokens to cut the question "
                             f"(truncate='tail' keeps the first max_length tokens instead)")
        return ids

    def _answer_labels(self, answer: str, input_ids: torch.Tensor, index: int) -> torch.Tensor:
        """Labels on the trailing answer and end-of-turn tokens, -100 elsewhere. They are the answer's
        own tokenization (it starts a new word after the assistant header), checked in place."""
        suffix = self.processor.tokenizer(answer + self.processor.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        if input_ids[-len(suffix):].tolist() != suffix:
            raise ValueError(f"split {self.split!r} row {index}: cannot locate the answer's tokens in the sequence")
        labels = torch.full_like(input_ids, -100)
        labels[-len(suffix):] = input_ids[-len(suffix):]
        return labels


@dataclass
class MultiModalCollator:
    """Pads a list of `MultiModalDataset` items into a batch: right padding for training, left for
    generation (`padding_side="left"`). Images' patch stacks are padded to the batch's largest
    (the model reads each image's own count from `image_sizes`)."""

    processor: object
    max_length: int = 2048
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left'; got padding_side={self.padding_side!r}")
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, items: Sequence[Dict]) -> Dict:
        length = max(item["input_ids"].shape[0] for item in items)
        if length > self.max_length:
            raise ValueError(f"a sequence of {length} tokens exceeds max_length={self.max_length}")
        batch = {"input_ids": [], "attention_mask": []}
        with_labels = "labels" in items[0]
        if with_labels:
            batch["labels"] = []
        for item in items:
            ids = item["input_ids"]
            pad = length - ids.shape[0]
            fill = ids.new_full((pad,), self.pad_id)
            mask = torch.cat([torch.ones_like(ids), torch.zeros_like(fill)])
            if self.padding_side == "left":
                batch["input_ids"].append(torch.cat([fill, ids]))
                batch["attention_mask"].append(mask.flip(0))
            else:
                batch["input_ids"].append(torch.cat([ids, fill]))
                batch["attention_mask"].append(mask)
            if with_labels:
                ignored = ids.new_full((pad,), -100)
                labels = item["labels"]
                batch["labels"].append(torch.cat([ignored, labels] if self.padding_side == "left" else [labels, ignored]))
        out = {key: torch.stack(values) for key, values in batch.items()}
        images = [item for item in items if "pixel_values" in item]
        if images:
            patches = max(item["pixel_values"].shape[0] for item in images)
            out["pixel_values"] = torch.stack([
                torch.cat([item["pixel_values"], item["pixel_values"].new_zeros(
                    patches - item["pixel_values"].shape[0], *item["pixel_values"].shape[1:])])
                for item in images])
            out["image_sizes"] = torch.stack([item["image_sizes"] for item in images])
            out["batch_num_images"] = torch.tensor([int("pixel_values" in item) for item in items])
        videos = [item["pixel_values_videos"] for item in items if "pixel_values_videos" in item]
        if videos:
            out["pixel_values_videos"] = torch.stack(videos)
        return out
