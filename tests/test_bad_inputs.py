"""Bad input a user plausibly gives: each is a one-line error naming the row, file or option, raised
before work is done (or, for a full disk, with the previous adapter left as it was)."""

import errno
import json
import os
import re
import struct

import av
import numpy as np
import pytest
import torch
from PIL import Image

import lime
from lime import cli
from lime.data import validate_split
from lime.tiny import build_tiny_llava_onevision
from lime_kernels import LiMELinear

ROWS = [{"source_type": "text", "media_path": "", "question": f"Is {n} even?", "answer": "yes" if n % 2 == 0 else "no"}
        for n in range(6)]


def _write_jsonl(directory, splits):
    os.makedirs(directory, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return str(directory)


def _video(path, frames=3):
    container = av.open(str(path), mode="w")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for step in range(frames):
        pixels = np.full((32, 32, 3), 40 * step, dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def _train(model_dir, data, output, *extra):
    return cli.main(["train", "--model", model_dir, "--data", data, "--output", str(output), "--max-steps", "1",
                     "--batch-size", "2", "--max-length", "512", "--save-steps", "1000", *extra])


def _one_line_error(capsys, command="train"):
    """The error line of stderr (progress bars of datasets and the Trainer may stand beside it)."""
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr
    # (A Trainer interrupted by the error leaves its progress bar open: the error follows it on its line.)
    lines = [line[line.index(f"lime {command}: error: "):] for line in stderr.replace("\r", "\n").split("\n")
             if f"lime {command}: error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_column_missing_from_one_split_file_is_named(tmp_path, model_dir, capsys):
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in ROWS]
    data = _write_jsonl(tmp_path / "data", {"train": rows, "text_test_parity": ROWS})
    assert _train(model_dir, data, tmp_path / "out") == 2
    error = _one_line_error(capsys)
    assert "split 'train': column(s) ['answer'] hold no value in any row (missing from its data file?)" in error
    data = _write_jsonl(tmp_path / "alone", {"train": rows})  # a file of its own: the column is absent
    assert _train(model_dir, data, tmp_path / "out") == 2
    assert "split 'train': missing column(s) ['answer']" in _one_line_error(capsys)


def test_an_empty_split_file_and_a_split_without_rows_are_named(tmp_path, model_dir, capsys):
    data = _write_jsonl(tmp_path / "data", {"train": ROWS, "text_test_parity": []})
    assert _train(model_dir, data, tmp_path / "out") == 2
    assert _one_line_error(capsys).endswith("text_test_parity.jsonl: empty data file (its split would have no rows)")
    import datasets

    saved = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "text_test_parity": datasets.Dataset.from_list(ROWS).filter(lambda row: False)}).save_to_disk(saved)
    unloadable = str(tmp_path / "not-a-model")  # checked before the model loads: it is never read
    os.makedirs(unloadable)
    assert cli.main(["eval", "--model", unloadable, "--adapter", str(tmp_path), "--data", saved, "--out",
                     str(tmp_path / "eval")]) == 2
    assert _one_line_error(capsys, "eval").endswith("split 'text_test_parity' has no rows")


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, model_dir, capsys):
    data = _write_jsonl(tmp_path / "data", {"train": ROWS})
    with open(os.path.join(data, "train.jsonl"), "ab") as handle:
        handle.write('{"source_type": "text", "media_path": "", "question": "café?", "answer": "oui"}\n'.encode("latin-1"))
    assert _train(model_dir, data, tmp_path / "out") == 2
    assert _one_line_error(capsys).endswith(f"{data}/train.jsonl line 7: not UTF-8 text (byte 0xe9 at column 59); "
                                            "re-save the file as UTF-8")


def test_broken_media_are_named_with_their_row(tmp_path):
    import datasets

    root = tmp_path / "media"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "good.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image at all")
    _video(root / "good.mp4")
    _video(root / "corrupt.mp4")
    data = bytearray((root / "corrupt.mp4").read_bytes())  # frames zeroed: the container parses, nothing decodes
    at = data.find(b"mdat")
    size = struct.unpack(">I", data[at - 4:at])[0]
    data[at + 4:at - 4 + size] = bytes(size - 8)
    (root / "corrupt.mp4").write_bytes(bytes(data))
    header_only = av.open(str(root / "empty.mp4"), mode="w")  # a video without a single frame
    stream = header_only.add_stream("mpeg4", rate=4)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    header_only.start_encoding()
    header_only.close()
    rows = [dict(ROWS[0], source_type="image", media_path="good.png"),
            dict(ROWS[0], source_type="image", media_path="broken.png"),
            dict(ROWS[0], source_type="video", media_path="good.mp4"),
            dict(ROWS[0], source_type="video", media_path="corrupt.mp4"),
            dict(ROWS[0], source_type="video", media_path="empty.mp4")]
    split = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError) as error:
        validate_split(split, "train", str(root))
    message = str(error.value)
    assert message.startswith("3 bad row(s): split 'train' row 1: unreadable image file ") and "broken.png" in message
    assert "split 'train' row 3: unreadable video file " in message and "corrupt.mp4" in message
    assert "split 'train' row 4: no video stream in " in message and "empty.mp4" in message
    kept, skipped = validate_split(split, "train", str(root), skip_bad_rows=True)
    assert len(kept) == 2 and [bad.row for bad in skipped] == [1, 3, 4]


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    data = _write_jsonl(tmp_path / "data", {"train": ROWS})
    unloadable = str(tmp_path / "not-a-model")
    os.makedirs(unloadable)
    a_file = tmp_path / "results"
    a_file.write_text("a file, not a folder")
    assert _train(unloadable, data, a_file) == 2
    assert _one_line_error(capsys).endswith(f"--output '{a_file}' is not a writable directory: File exists")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if os.geteuid() != 0:
        read_only.chmod(0o555)
    else:  # root writes anywhere: the folder refuses as a read-only mount would
        import tempfile

        real = tempfile.TemporaryFile

        def refused(*args, dir=None, **kwargs):
            if dir is not None and os.path.abspath(dir) == str(read_only):
                raise PermissionError(errno.EACCES, "Permission denied", dir)
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    assert _train(unloadable, data, read_only) == 2
    assert _one_line_error(capsys).endswith(f"--output '{read_only}' is not a writable directory: Permission denied")
    assert cli.main(["eval", "--model", unloadable, "--adapter", str(tmp_path), "--data", data, "--out",
                     str(read_only)]) == 2
    assert _one_line_error(capsys, "eval").endswith(f"--out '{read_only}' is not a writable directory: Permission denied")


def test_a_full_disk_at_the_final_save_is_one_line_and_keeps_the_previous_adapter(tmp_path, model_dir, capsys,
                                                                                   monkeypatch):
    import safetensors.torch

    data = _write_jsonl(tmp_path / "data", {"train": ROWS})
    output = tmp_path / "out"
    assert _train(model_dir, data, output) == 0
    adapter = output / "adapter"
    before = {name: (adapter / name).read_bytes() for name in sorted(os.listdir(adapter))}
    capsys.readouterr()

    def full(tensors, path, *args, **kwargs):
        with open(path, "wb") as handle:  # a disk fills part-way through a file
            handle.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert _train(model_dir, data, output, "--seed", "1") == 2
    error = _one_line_error(capsys)
    assert "[Errno 28] No space left on device: " in error and ".adapter_model.safetensors.saving-" in error
    assert {name: (adapter / name).read_bytes() for name in sorted(os.listdir(adapter))} == before
    monkeypatch.undo()
    lime.load_adapter(build_tiny_llava_onevision(seed=0)[0], str(adapter))
    # The checkpoint the failed save was writing over is the previous run's, whole.
    lime.load_adapter(build_tiny_llava_onevision(seed=0)[0], str(output / "checkpoint-1"))
    assert lime.trainer.checkpoint_problem(str(output / "checkpoint-1")) is None


@pytest.mark.parametrize("mask,message", [
    (torch.ones(2, 3, dtype=torch.float16), "attention_mask must be bool or integer (1 = valid token, 0 = padding); "
                                            "got dtype torch.float16"),
    (torch.ones(2, 3, dtype=torch.complex64), "got dtype torch.complex64"),
    ([[1, 1, 1], [1, 1, 0]], "attention_mask must be a torch.Tensor; got list"),
    (torch.ones(2, 4, dtype=torch.long), "attention_mask of shape (2, 4) does not match input of shape (2, 3, 8)"),
])
def test_a_layer_mask_of_the_wrong_dtype_type_or_shape_is_named(mask, message):
    layer = LiMELinear(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(torch.randn(2, 3, 8), attention_mask=mask)
    assert torch.equal(layer(torch.randn(2, 3, 8), attention_mask=torch.ones(2, 3, dtype=torch.uint8)).isfinite(),
                       torch.ones(2, 3, 8, dtype=torch.bool))
