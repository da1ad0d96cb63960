"""`import lime` and `lime --help` are quiet and import nothing heavy they do not need: transformers'
Trainer (which pulls in peft and bitsandbytes), datasets and torch.distributed.tensor load on first use."""

import logging
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("transformers", "peft", "bitsandbytes", "datasets", "accelerate", "torch.distributed.tensor")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("code", [
    "import lime",
    "import lime_kernels",
    "import sys; from lime.cli import main; sys.argv = ['lime', '--help']; main()",
    "import sys; from lime.cli import main; sys.argv = ['lime', 'train', '--help']; main()",
], ids=["import lime", "import lime_kernels", "lime --help", "lime train --help"])
def test_nothing_heavy_is_imported_and_nothing_printed_on_stderr(code):
    probe = f"""
import atexit, sys
atexit.register(lambda: print('LOADED', [m for m in {HEAVY!r} if m in sys.modules]))
{code}
"""
    result = _run(probe)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "LOADED []" in result.stdout, result.stdout[-500:]


def test_the_trainer_loads_on_first_use_without_the_hub_kernel_notice():
    # On a CPU with AVX512-BF16 (this project's CI machine) importing bitsandbytes logs the notice unfiltered.
    result = _run("import lime; lime.LiMETrainer")
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr and "Failed to load" not in result.stderr, result.stderr
    from lime import LiMEArguments, LiMETrainer  # the lazy names import as the eager ones did

    assert LiMETrainer.__module__ == "lime.trainer" and LiMEArguments.__module__ == "lime.trainer"
    with pytest.raises(AttributeError, match="has no attribute 'LiMETrainr'"):
        import lime

        lime.LiMETrainr


def test_only_the_hub_kernel_notice_of_bitsandbytes_is_dropped(caplog):
    import lime  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline")
        logger.warning("a real bitsandbytes problem: %s", "libbitsandbytes_cpu.so not found")
    assert [record.getMessage() for record in caplog.records] == [
        "a real bitsandbytes problem: libbitsandbytes_cpu.so not found"]
