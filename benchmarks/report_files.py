"""The output folder of `gpu_report`: a fixed set of files, each kept under a size cap, and result rows
appended as JSON lines the moment they are known (one `write` per row, flushed), so that a run killed
at any point leaves every row it finished intact and parseable.

The caps are those of the GPU machine's file transfer (at most 8 files of 16 MiB each, no subfolders).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Iterator

RESULTS = "results.jsonl"
SUMMARY = "summary.md"
PYTEST_LOG = "pytest.log"
PROFILE = "profile.txt"
FILES = (RESULTS, SUMMARY, PYTEST_LOG, PROFILE)
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
CAP_BYTES = 15 * 2**20  # what this code writes per file: a margin under MAX_FILE_BYTES


def _finite(value):
    """JSON without NaN or infinities (which strict readers refuse): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


class ReportDir:
    """`run` names the run (its rows carry it); `start` is its start time (`time.time()`): each row's `t`
    is the seconds since. Several processes may append in turn (the pytest child between the parent's
    rows); each checks the file's size before it writes."""

    def __init__(self, path: str, run: str, start: float, cap_bytes: int = CAP_BYTES):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--out must be a directory; {path!r} is a file")
        os.makedirs(path, exist_ok=True)
        self.path, self.run, self.start, self.cap_bytes = path, run, start, cap_bytes
        self.dropped_rows = 0
        self.truncated = set()

    def file(self, name: str) -> str:
        if name not in FILES:
            raise ValueError(f"report file {name!r} is not one of {FILES}")
        return os.path.join(self.path, name)

    def _size(self, name: str) -> int:
        path = self.file(name)
        return os.path.getsize(path) if os.path.exists(path) else 0

    def row(self, step: str, kind: str, **fields) -> Dict:
        """Appends `{"run", "t", "step", "kind", **fields}` to results.jsonl. Past the cap the row is
        dropped and counted; the first drop appends one `rows-dropped` row saying so."""
        row = _finite(dict(run=self.run, t=round(time.time() - self.start, 3), step=step, kind=kind, **fields))
        line = json.dumps(row, allow_nan=False, default=str) + "\n"  # str: a dtype, a device, ...
        if self._size(RESULTS) + len(line.encode()) > self.cap_bytes - 4096:  # room for the marker
            self.dropped_rows += 1
            if self.dropped_rows == 1:
                marker = dict(run=self.run, t=row["t"], step=step, kind="rows-dropped",
                              note=f"{RESULTS} reached its {self.cap_bytes} byte cap; later rows are dropped")
                self._append(RESULTS, json.dumps(marker) + "\n")
            return row
        self._append(RESULTS, line)
        return row

    def append_text(self, name: str, text: str) -> None:
        """Appends to a text file up to the cap; the first text that would pass it ends the file with a
        line saying so."""
        size, data = self._size(name), text.encode()
        if name in self.truncated:
            return
        if size + len(data) > self.cap_bytes - 256:
            self.truncated.add(name)
            data = data[: max(0, self.cap_bytes - 256 - size)] + f"\n[{name} truncated at its size cap]\n".encode()
        self._append(name, data.decode(errors="replace"))

    def write_text(self, name: str, text: str) -> None:
        """Replaces a text file (the summary) in one step: a reader or a kill never sees half of it."""
        data = text.encode()
        if len(data) > self.cap_bytes:
            data = data[: self.cap_bytes - 256] + f"\n[{name} truncated at its size cap]\n".encode()
        temporary = self.file(name) + ".partial"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, self.file(name))

    def _append(self, name: str, text: str) -> None:
        with open(self.file(name), "a", encoding="utf-8") as handle:
            handle.write(text)


def read_rows(path: str) -> Iterator[Dict]:
    """The rows of a results.jsonl; a line that does not parse raises a ValueError naming it."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON row ({error}): {line[:200]!r}") from None


def limit_problems(path: str) -> list:
    """What in folder `path` breaks the transfer limits: too many files, subfolders, files too large."""
    entries = sorted(os.listdir(path))
    problems = [f"{name} is a folder" for name in entries if os.path.isdir(os.path.join(path, name))]
    problems += [f"{name} is {os.path.getsize(os.path.join(path, name))} bytes" for name in entries
                 if os.path.isfile(os.path.join(path, name))
                 and os.path.getsize(os.path.join(path, name)) >= MAX_FILE_BYTES]
    if len(entries) > MAX_FILES:
        problems.append(f"{len(entries)} entries (at most {MAX_FILES})")
    return problems
