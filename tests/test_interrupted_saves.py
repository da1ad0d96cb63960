"""Saves survive interrupts: an interrupt (or crash) at any write or rename of `save_adapter`, or of
LiMETrainer's checkpoint save, leaves the complete old adapter or the complete new one; files of two saves
are refused; staging files are cleaned up by the next save. Faults are injected at every step in turn,
and a real SIGINT is sent to a process saving in a loop."""

import builtins
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import safetensors.torch
import torch

import lime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt (a BaseException too) without touching pytest's own handling of it."""


class FaultInjector:
    """Counts the file writes and renames made while `armed`; raises `Interrupted` at event `fail_at`,
    either before the operation, after it, or (for a file write) after writing only its first half."""

    def __init__(self, fail_at=None, when="before"):
        self.fail_at, self.when, self.events, self.armed = fail_at, when, [], False

    def _event(self, name, operation, path=None):
        if not self.armed:
            return operation()
        index = len(self.events)
        self.events.append(name)
        if index == self.fail_at and self.when == "before":
            raise Interrupted(f"before {name}")
        result = operation()
        if index == self.fail_at and self.when == "torn" and path is not None and os.path.isfile(path):
            os.truncate(path, os.path.getsize(path) // 2)
            raise Interrupted(f"half-way through {name}")
        if index == self.fail_at and self.when in ("after", "torn"):
            raise Interrupted(f"after {name}")
        return result

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        real_save, real_replace, real_open, real_torch_save = (safetensors.torch.save_file, os.replace, builtins.open,
                                                               torch.save)

        def save_file(tensors, path, *args, **kwargs):
            return self._event(f"safetensors {os.path.basename(path)}", lambda: real_save(tensors, path, *args, **kwargs),
                               path)

        def replace(source, target, *args, **kwargs):
            return self._event(f"rename {os.path.basename(str(source))} -> {os.path.basename(str(target))}",
                               lambda: real_replace(source, target, *args, **kwargs))

        def open_(file, mode="r", *args, **kwargs):
            if not isinstance(file, (str, os.PathLike)) or not any(flag in mode for flag in "wax+"):
                return real_open(file, mode, *args, **kwargs)
            return self._event(f"write {os.path.basename(str(file))}",
                               lambda: real_open(file, mode, *args, **kwargs))

        def torch_save(obj, file, *args, **kwargs):
            path = str(file) if isinstance(file, (str, os.PathLike)) else None
            return self._event(f"torch.save {os.path.basename(str(path))}",
                               lambda: real_torch_save(obj, file, *args, **kwargs), path)

        real_dump = json.dump

        def dump(obj, handle, *args, **kwargs):
            def write():
                real_dump(obj, handle, *args, **kwargs)
                handle.flush()
            return self._event(f"json.dump {os.path.basename(handle.name)}", write, handle.name)

        monkeypatch.setattr(json, "dump", dump)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(torch, "save", torch_save)
        try:
            yield self
        finally:
            monkeypatch.undo()


def _model(rank, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    torch.manual_seed(0)
    lime.apply_peft(model, rank=rank, num_experts=4)
    with torch.no_grad():
        for _, layer in lime.lime_layers(model):
            layer.B.normal_(0, 1)
            layer.LiMEs.normal_(0, 1)
    return model


def _state(model):
    return {f"{name}.{key}": value.detach().clone() for name, layer in lime.lime_layers(model)
            for key, value in layer.state_dict().items() if not key.startswith("linear.")}


def _loaded_state(directory):
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    return _state(lime.load_adapter(base, directory))


def _same(first, second):
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _events_of_a_save(tmp_path, monkeypatch):
    directory = str(tmp_path / "count")
    lime.save_adapter(_model(2, 0), directory)
    injector = FaultInjector()
    with injector.installed(monkeypatch):
        injector.armed = True
        lime.save_adapter(_model(4, 1), directory)
    return injector.events


def test_the_fault_points_cover_every_write_and_rename_of_a_save(tmp_path, monkeypatch):
    events = _events_of_a_save(tmp_path, monkeypatch)
    assert [event.split()[0] for event in events] == ["safetensors", "write", "json.dump", "rename", "rename"], events
    assert events[3].endswith("-> adapter_model.safetensors") and events[4].endswith("-> adapter_config.json")


# What the folder holds after an interrupt at each event (safetensors, open, json.dump, rename, rename):
# "old", "new", or "new*" (the new weights beside the old config, paired with the staged new config).
EXPECTED = {
    "before": ["old", "old", "old", "old", "new*"],
    "torn": ["old", "old", "old", "new*", "new"],
    "after": ["old", "old", "old", "new*", "new"],
}


@pytest.mark.parametrize("when", list(EXPECTED))
def test_an_interrupt_at_any_step_of_a_save_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, when):
    """Save rank 2, then rank 4 into the same folder interrupted at each step: the folder loads as one of
    the two (never a mix), and the next save leaves exactly the two files of a complete adapter."""
    old_model, new_model = _model(2, 0), _model(4, 1)
    old, new = _state(old_model), _state(new_model)
    assert len(_events_of_a_save(tmp_path, monkeypatch)) == len(EXPECTED[when])
    for fail_at, expected in enumerate(EXPECTED[when]):
        directory = str(tmp_path / f"{when}-{fail_at}")
        lime.save_adapter(old_model, directory)
        injector = FaultInjector(fail_at, when)
        with injector.installed(monkeypatch), pytest.raises(Interrupted):
            injector.armed = True
            lime.save_adapter(new_model, directory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = _loaded_state(directory)
        where = f"interrupted {when} {injector.events[fail_at]!r}"
        assert _same(loaded, new if expected.startswith("new") else old), where
        paired = [str(w.message) for w in caught if "was interrupted between writing its weights" in str(w.message)]
        assert len(paired) == (expected == "new*"), (where, [str(w.message) for w in caught])
        # The next save finishes or clears what the interrupted one left.
        lime.save_adapter(new_model, directory)
        assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"], where
        assert _same(_loaded_state(directory), new), where


def test_an_interrupted_save_is_finished_by_the_next_save_of_anything(tmp_path, monkeypatch):
    """Interrupted between its renames, then a third adapter saved there: a complete third adapter; and
    interrupted again before that save's renames, the second (finished) one stands."""
    first, second, third = _model(2, 0), _model(4, 1), _model(3, 2)
    directory = str(tmp_path / "adapter")
    lime.save_adapter(first, directory)
    injector = FaultInjector(4, "before")  # before the config's rename
    with injector.installed(monkeypatch), pytest.raises(Interrupted):
        injector.armed = True
        lime.save_adapter(second, directory)
    # The next save: finishes the second (its event 0), then is interrupted before its own first rename.
    injector = FaultInjector(4, "before")
    with injector.installed(monkeypatch), pytest.raises(Interrupted):
        injector.armed = True
        lime.save_adapter(third, directory)
    assert injector.events[0].startswith("rename .adapter_config.json.saving-"), injector.events
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a consistent pair again: nothing to warn about
        assert _same(_loaded_state(directory), _state(second))


def test_files_of_two_saves_are_refused_naming_both(tmp_path):
    lime.save_adapter(_model(2, 0), str(tmp_path / "a"))
    lime.save_adapter(_model(4, 1), str(tmp_path / "b"))
    shutil.copy(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
    ids = [json.load(open(tmp_path / name / "adapter_config.json"))["save_id"] for name in ("b", "a")]
    with pytest.raises(ValueError, match=(rf"adapter_model.safetensors and \S+adapter_config.json come from different "
                                          rf"saves \(save id {ids[0]} and {ids[1]}\)")):
        _loaded_state(str(tmp_path / "a"))


def test_the_same_adapter_saved_twice_gives_the_same_bytes(tmp_path):
    model = _model(2, 0)
    for name in ("a", "b"):
        lime.save_adapter(model, str(tmp_path / name))
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


SAVER = """
import sys, torch, lime
sys.path.insert(0, {here!r})
from test_interrupted_saves import _model
models = [_model(2, 0), _model(4, 1)]
directory = sys.argv[1]
lime.save_adapter(models[0], directory)
print("ready", flush=True)
count = 0
while True:
    count += 1
    lime.save_adapter(models[count % 2], directory)
"""


def test_a_real_sigint_during_saves_in_a_loop_leaves_a_loadable_adapter(tmp_path):
    """SIGINT to a process saving two adapters in turn into one folder, at varied moments: each time the folder
    loads as one of the two, and a save afterwards leaves just the two files."""
    states = [_state(_model(2, 0)), _state(_model(4, 1))]
    env = dict(os.environ, PYTHONPATH=ROOT)
    for trial in range(6):
        directory = str(tmp_path / f"trial-{trial}")
        child = subprocess.Popen([sys.executable, "-c", SAVER.format(here=HERE), directory], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * trial)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
        assert child.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-2000:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # interrupted between the renames: loads with a warning
            loaded = _loaded_state(directory)
        assert any(_same(loaded, state) for state in states), f"trial {trial}: a mix"
        lime.save_adapter(_model(2, 0), directory)
        assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]


def _trainer(output, trainer_class=None, **overrides):
    from llava_helpers import README_TARGETS, TinyCollator, TinyConversations

    from lime.tiny import build_tiny_llava_onevision

    model, processor = build_tiny_llava_onevision(seed=0)
    torch.manual_seed(0)
    lime.apply_peft(model, targets=README_TARGETS, tokenizer=processor.tokenizer)
    values = dict(output_dir=str(output), per_device_train_batch_size=2, max_steps=4, moe_lr=2e-2, peft_lr=1e-2,
                  logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], seed=0,
                  dataloader_num_workers=0, balance_every_n_steps=2, use_cpu=True, disable_tqdm=True,
                  remove_unused_columns=False)
    values.update(overrides)
    cls = trainer_class or lime.LiMETrainer
    return cls(model=model, args=lime.LiMEArguments(**values), train_dataset=TinyConversations(16),
               data_collator=TinyCollator(processor), processing_class=processor), model


class _InterruptedAtStep4(lime.LiMETrainer):
    """Arms the fault injector for the checkpoint save of step 4 only."""

    injector = None

    def _save_checkpoint(self, model, trial):
        self.injector.armed = self.state.global_step == 4
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.injector.armed = False


def test_an_interrupt_at_any_write_of_a_checkpoint_save_resumes_from_a_complete_checkpoint(tmp_path, monkeypatch):
    """Training saves checkpoint-2, then checkpoint-4 interrupted at each of its writes in turn:
    resume_from_checkpoint=True takes checkpoint-4 once its trainer_state.json is whole, else checkpoint-2,
    and the resumed run ends with the parameters of an uninterrupted one, bit for bit."""
    trainer, model = _trainer(tmp_path / "straight", max_steps=6)
    trainer.train()
    straight = _state(model)

    injector = FaultInjector()
    _InterruptedAtStep4.injector = injector
    trainer, _ = _trainer(tmp_path / "count", trainer_class=_InterruptedAtStep4, max_steps=4)
    with injector.installed(monkeypatch):
        trainer.train()
    events = list(injector.events)
    # The adapter's files, the optimizer, scheduler and RNG states, the processor, then the trainer state.
    assert events[0].startswith("safetensors .adapter_model.safetensors.saving-") and len(events) >= 8, events
    assert events[-1] == "write trainer_state.json", events
    state_write = len(events) - 1

    for fail_at in range(len(events)):
        output = tmp_path / f"run-{fail_at}"
        injector = FaultInjector(fail_at, "after" if fail_at % 2 else "before")
        _InterruptedAtStep4.injector = injector
        trainer, _ = _trainer(output, trainer_class=_InterruptedAtStep4, max_steps=6)
        with injector.installed(monkeypatch), pytest.raises(Interrupted):
            trainer.train()
        where = f"interrupted {injector.when} {events[fail_at]!r}"
        complete = fail_at > state_write  # an interrupt at the state's own write leaves it empty or absent
        resumed, model = _trainer(output, max_steps=6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed.train(resume_from_checkpoint=True)
        passed_over = [str(w.message) for w in caught if "passing over" in str(w.message)]
        if complete:
            assert not passed_over, where
        else:
            assert len(passed_over) == 1 and "checkpoint-4" in passed_over[0], (where, passed_over)
        assert _same(_state(model), straight), where
        assert sorted(os.listdir(output)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"], where
