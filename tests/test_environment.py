"""The locked test environment agrees with setup.py, and the lock tool reads and checks what it should."""

import os
import sys

import pytest
from packaging.requirements import Requirement

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import lock  # noqa: E402


def test_every_requirement_of_setup_py_is_locked_within_its_range():
    pins = lock.read_lock()
    problems = []
    for group, requirements in lock.setup_requirements().items():
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            name = lock.normalized(requirement.name)
            if name not in pins:
                problems.append(f"{text} ({group}) is not in the lock")
            elif not requirement.specifier.contains(pins[name], prereleases=True):
                problems.append(f"{text} ({group}): the lock has {name}=={pins[name]}")
    assert not problems, "\n".join(problems)


def test_the_makefile_installs_the_locked_torch():
    pins = lock.read_lock()
    makefile = open(os.path.join(lock.ROOT, "Makefile"), encoding="utf-8").read()
    pinned = next(line for line in makefile.splitlines() if line.startswith("TORCH_PINS"))
    for spec in pinned.split(":=", 1)[1].split():
        name, version = spec.split("==")
        assert pins[lock.normalized(name)] == version, f"Makefile pins {spec}, the lock {name}=={pins[name]}"


def test_the_lock_refuses_a_line_that_is_not_an_exact_pin(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# a comment\nnumpy==2.0.0  # trailing\n\ntorch>=2.6\n")
    with pytest.raises(ValueError, match=r"constraints.txt:4: 'torch>=2.6' is not an exact pin"):
        lock.read_lock(str(path))
    path.write_text("# a comment\nNumPy==2.0.0  # trailing\nhuggingface_hub==1.0\n")
    assert lock.read_lock(str(path)) == {"numpy": "2.0.0", "huggingface-hub": "1.0"}


def test_the_check_names_every_difference_from_the_lock(tmp_path, monkeypatch):
    present = lock.installed()
    name = sorted(present)[0]
    monkeypatch.setattr(lock, "LOCK", str(tmp_path / "constraints.txt"))
    lines = [f"{other}=={version}" for other, version in present.items() if other != name]
    lines += ["not-a-real-package==1.0"]
    (tmp_path / "constraints.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        lock.check()
    message = str(exit_info.value)
    assert f"{name}: installed {present[name]}, not in the lock" in message
    assert "not-a-real-package: locked 1.0, installed nothing" in message


def test_setup_py_requirements_are_read_as_written():
    requirements = lock.setup_requirements()
    assert "transformers>=5.0,<6" in requirements["install"]
    assert set(requirements) == {"install", "video", "test"}
