"""The locked test environment: `constraints.txt` pins every package of the venv `make test` builds.

    python tools/lock.py write   # run by `make lock`: the running venv's packages -> constraints.txt
    python tools/lock.py check   # run by `make test`: the running venv holds exactly the locked versions

`setup.py` keeps ranges for users; `tests/test_environment.py` checks that every locked version lies in
them. The lock is read off a venv built on Linux x86_64 with Python 3.11 (this project's CI machine).
"""

from __future__ import annotations

import ast
import os
import re
import sys
from importlib import metadata
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "constraints.txt")
PROJECT = "lime-moe"
HEADER = """\
# The locked test environment (`make test`, `make demo`): every package of the venv, exact versions.
# Read off a venv of the newest versions setup.py allows (Linux x86_64, Python {python}) by
# `make test-latest && make lock`; the venv key includes this file, so a new lock builds a new venv.
"""


def normalized(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> Dict[str, str]:
    """{normalized name: version} of every distribution the running interpreter sees, but the project."""
    versions = {normalized(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    versions.pop(PROJECT, None)
    return versions


def read_lock(path: Optional[str] = None) -> Dict[str, str]:
    """{normalized name: version} of the lock; a line that is not `name==version` is an error naming it."""
    path = path or LOCK
    pins: Dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
            if match is None:
                raise ValueError(f"{path}:{number}: {line!r} is not an exact pin `name==version`")
            pins[normalized(match.group(1))] = match.group(2)
    return pins


def setup_requirements(path: str = os.path.join(ROOT, "setup.py")) -> Dict[str, List[str]]:
    """setup.py's requirement strings: {'install': [...], '<extra>': [...]} (read as literals, not run)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    requirements = {"install": ast.literal_eval(keywords["install_requires"])}
    requirements.update(ast.literal_eval(keywords["extras_require"]))
    return requirements


def write() -> None:
    versions = installed()
    lines = [HEADER.format(python=".".join(map(str, sys.version_info[:2])))]
    lines += [f"{name}=={versions[name]}\n" for name in sorted(versions)]
    with open(LOCK, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
    print(f"wrote {len(versions)} pins to {LOCK}")


def check() -> None:
    """Exit 1, naming each difference, unless the running venv holds exactly the locked versions."""
    locked, present = read_lock(), installed()
    problems = [f"{name}: locked {version}, installed {present.get(name, 'nothing')}"
                for name, version in sorted(locked.items()) if present.get(name) != version]
    problems += [f"{name}: installed {version}, not in the lock" for name, version in sorted(present.items())
                 if name not in locked]
    if problems:
        sys.exit(f"{sys.prefix} does not hold the locked environment ({LOCK}):\n  " + "\n  ".join(problems)
                 + "\nRebuild it: make clean-venv && make venv")
    print(f"{sys.prefix}: the {len(locked)} locked versions")


if __name__ == "__main__":
    commands = {"write": write, "check": check}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {sys.argv[0]} {{{'|'.join(commands)}}}")
    commands[sys.argv[1]]()
