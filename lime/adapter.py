"""Save and load LiME adapters: only LiME's tensors (safetensors) and a JSON config.

    save_adapter(model, "adapter/")           # adapter_config.json + adapter_model.safetensors
    model = load_adapter(fresh_base_model, "adapter/")

The config records every LiME layer by its qualified name: its class (the PEFT variant), the shape
of the layer it wraps and every hyperparameter, so `load_adapter` re-creates the same layers on a
fresh base model and the outputs are bit-identical. It also records the base model's class and sizes;
`load_adapter` into a model of another class warns, naming both.

A save is all or nothing, whenever it is interrupted (Ctrl-C, a crash, a full disk): both files are
written in full beside their final names (flushed to disk), then renamed into place, the weights
first. Both carry the same save id (a hash of their content), so the two files of one save are recognised as
a pair:
- interrupted before the first rename, the previous adapter is untouched;
- interrupted between the renames, the new weights sit beside the previous config, and the new
  config waits complete under its staging name: `load_adapter` reads the pair by its save id, and
  the next save finishes the rename;
- files of two different saves with no staged config to pair them (copied by hand) are refused,
  naming both ids.
Every other staging file is removed by the next save. Nothing else in the directory is touched (it may
be a training run's output directory).

A model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`: its parameters are DTensors) or by
DeepSpeed ZeRO-3 is saved by every process together: each LiME tensor is gathered in full (a
collective), rank 0 alone writes, and every process learns whether the write succeeded. `load_adapter`
loads into a model before it is sharded and into an FSDP2-sharded one (each process keeps its own
shard of the saved tensors); into a ZeRO-3-partitioned one it does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from dataclasses import asdict, replace
from typing import Dict, Optional, Tuple

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn

from lime_kernels import (
    LiMEDoRALinear,
    LiMEEmbedding,
    LiMELinear,
    LiMELoRAFALinear,
    LiMEModule,
    LiMEPromptEncoder,
    LiMESliceFineLinear,
)
from lime_kernels.bases import is_wrappable_linear, linear_features
from lime_kernels.options import BACKENDS, AdapterOptions, RoutingOptions, require_choice

from .config import LiMEConfig, _dtype_from_name, _dtype_name
from .injection import (_install_mask_scopes, freeze_base, lime_layers, record_base_flags, replace_children,
                        requires_grad_restored)
from .prompt_tuning import attach_prompt_encoder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Where LiMETrainer's checkpoints and `save_model` put the adapter, inside their output directory.
TRAINER_ADAPTER_DIR = "lime_adapter"
FORMAT = "lime-adapter"
VERSION = 1

LINEAR_CLASSES = {cls.__name__: cls for cls in (LiMELinear, LiMELoRAFALinear, LiMEDoRALinear, LiMESliceFineLinear)}
SAVED_CLASSES = {*LINEAR_CLASSES.values(), LiMEEmbedding, LiMEPromptEncoder}


def _class_name(layer: LiMEModule) -> str:
    """The LiME class of `layer`: `fully_shard` on a layer swaps its class for a subclass (FSDP<name>)."""
    return next(cls.__name__ for cls in type(layer).__mro__ if cls in SAVED_CLASSES)


def _adapter_options(options: AdapterOptions) -> dict:
    record = asdict(options)
    for name in ("peft_dtype", "moe_dtype"):
        record[name] = _dtype_name(record[name])
    return record


def _layer_record(layer: LiMEModule) -> dict:
    record = {"class": _class_name(layer), "peft": layer.peft, "routing": asdict(layer.routing),
              "adapter": _adapter_options(layer.adapter)}
    if isinstance(layer, LiMELinear):
        record["base"] = {"type": type(layer.linear).__name__, "in_features": layer.in_features,
                          "out_features": layer.out_features}
        if isinstance(layer, LiMEDoRALinear):
            record["dora_detach_norm"] = layer.dora_detach_norm
    elif isinstance(layer, LiMEEmbedding):
        record["base"] = {"type": type(layer.embedding).__name__, "num_embeddings": layer.num_embeddings,
                          "embedding_dim": layer.embedding_dim}
        record["pad_token_id"] = layer.pad_token_id
    else:
        record["num_virtual_tokens"] = layer.num_virtual_tokens
        record["hidden_size"] = layer.hidden_size
        record["input_conditioned"] = layer.input_conditioned
    return record


def _own_tensors(layer: LiMEModule) -> Dict[str, torch.Tensor]:
    """The layer's own parameters and persistent buffers (not the frozen layer it wraps)."""
    tensors = dict(layer.named_parameters(recurse=False))
    persistent = {name for name in layer._buffers if name not in layer._non_persistent_buffers_set}
    tensors.update({name: buffer for name, buffer in layer.named_buffers(recurse=False) if name in persistent})
    return tensors


def is_dtensor(value: torch.Tensor) -> bool:
    """Whether `value` is a DTensor (FSDP2, tensor parallel). No DTensor exists unless
    `torch.distributed.tensor` was imported, and importing it costs a second, so it is not imported here."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _zero3_partitioned(value: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 has partitioned (its own attribute; the tensor itself is empty)."""
    return hasattr(value, "ds_id")


def is_sharded(model: nn.Module) -> bool:
    """Whether any LiME tensor of `model` is a DTensor (FSDP2 / tensor parallel) or partitioned by
    DeepSpeed ZeRO-3: saving is then collective."""
    return any(is_dtensor(value) or _zero3_partitioned(value)
               for _, layer in lime_layers(model) for value in _own_tensors(layer).values())


def _gathered_tensors(layers) -> Dict[str, torch.Tensor]:
    """Every LiME tensor in full, on CPU (collective gathers for sharded tensors)."""
    owned = [(f"{name}.{key}", value) for name, layer in layers for key, value in _own_tensors(layer).items()]
    partitioned = [value for _, value in owned if _zero3_partitioned(value)]
    if not partitioned:
        return {key: _full_cpu(value) for key, value in owned}
    import deepspeed  # only a model that DeepSpeed partitioned gets here

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return {key: _full_cpu(value) for key, value in owned}


def _full_cpu(value: torch.Tensor) -> torch.Tensor:
    # full_tensor() is a collective: every process of the tensor's mesh must reach it, in the same order.
    if is_dtensor(value):
        value = value.full_tensor()
    return value.detach().to("cpu", copy=True).contiguous()


def _model_class(model: nn.Module) -> str:
    """The model's own class: `fully_shard` swaps it for a subclass it builds (FSDP<name>)."""
    return next(cls.__name__ for cls in type(model).__mro__ if not cls.__module__.startswith("torch.distributed"))


# The sizes of a Hugging Face config that tell one base model from another of the same class.
_BASE_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size")


def _base_model_record(model: nn.Module) -> dict:
    """The base model's class and, for a Hugging Face model, its type and sizes (those of its sub-configs
    too, e.g. `text_config.hidden_size`)."""
    record = {"class": _model_class(model), "model_type": None, "sizes": {}}
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return record
    values = config.to_dict()
    record["model_type"] = values.get("model_type")

    def collect(prefix: str, entries: dict) -> None:
        for key, value in sorted(entries.items()):
            if isinstance(value, dict) and key.endswith("_config"):
                collect(f"{prefix}{key}.", value)
            elif key in _BASE_SIZES and isinstance(value, int) and not isinstance(value, bool):
                record["sizes"][prefix + key] = value

    collect("", values)
    return record


def save_adapter(model: nn.Module, directory: str) -> str:
    """Write the LiME layers of `model` to `directory` (all or nothing, however it is interrupted: see
    the module's docstring; the directory's other contents kept); returns the directory.

    For a sharded model every process must call it: the tensors are gathered on all of them, rank 0
    writes, and a failed write raises on every process (the previous adapter stays in place).
    """
    layers = list(lime_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LiME layer to save")
    config = {
        "format": FORMAT,
        "version": VERSION,
        "lime_config": model.lime_config.to_dict() if isinstance(getattr(model, "lime_config", None), LiMEConfig) else None,
        "base_model": _base_model_record(model),
        "layers": {name: _layer_record(layer) for name, layer in layers},
    }
    sharded = is_sharded(model)
    tensors = _gathered_tensors(layers)
    directory = os.path.abspath(directory)
    if not sharded:
        return _write(config, tensors, directory)
    failure = None
    if dist.get_rank() == 0:
        try:
            _write(config, tensors, directory)
        except BaseException as error:  # re-raised below, after the other processes have heard of it
            failure = error
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"saving the LiME adapter to {directory} failed on rank 0: {outcome[0]}")
    return directory


# `.adapter_model.safetensors.saving-<save id>`, `.adapter_config.json.saving-<save id>` (see `_staged_path`)
_STAGED = re.compile(rf"\.({re.escape(ADAPTER_WEIGHTS)}|{re.escape(ADAPTER_CONFIG)})\.saving-([0-9a-f]{{32}})")


def _staged_path(directory: str, name: str, save_id: str) -> str:
    return os.path.join(directory, f".{name}.saving-{save_id}")


def _write(config: dict, tensors: Dict[str, torch.Tensor], directory: str) -> str:
    """Stage both files in full (flushed to disk), then rename the weights, then the config, over their
    final names; see the module's docstring for what an interruption at each point leaves."""
    os.makedirs(directory, exist_ok=True)
    _settle_staging(directory)
    save_id = _content_id(config, tensors)
    config = dict(config, save_id=save_id)
    staged = {name: _staged_path(directory, name, save_id) for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
    try:
        # One metadata entry: safetensors writes several in no fixed order, and the bytes must repeat.
        safetensors.torch.save_file(tensors, staged[ADAPTER_WEIGHTS], metadata={"save_id": save_id})
        _flush_to_disk(staged[ADAPTER_WEIGHTS])
        with open(staged[ADAPTER_CONFIG], "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        for path in staged.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    os.replace(staged[ADAPTER_WEIGHTS], os.path.join(directory, ADAPTER_WEIGHTS))
    os.replace(staged[ADAPTER_CONFIG], os.path.join(directory, ADAPTER_CONFIG))
    _flush_to_disk(directory)  # the renames themselves
    return directory


def _content_id(config: dict, tensors: Dict[str, torch.Tensor]) -> str:
    """The save id: a hash of what is saved, so that the same adapter saved twice (or by every way of
    saving it: sharded, from one process) gives byte-identical files."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for key in sorted(tensors):
        value = tensors[key]
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, not a copy
    return digest.hexdigest()[:32]


def _flush_to_disk(path: str) -> None:
    """fsync a file, or a directory (its entries: a rename survives a power cut only then)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _settle_staging(directory: str) -> None:
    """Before a save: finish a save interrupted between its two renames (its staged config is renamed
    over the previous one), and remove every other staging file an interrupted save left."""
    weights_id = _weights_save_id(os.path.join(directory, ADAPTER_WEIGHTS))
    for entry in sorted(os.listdir(directory)):
        match = _STAGED.fullmatch(entry)
        if match is None:
            continue
        path = os.path.join(directory, entry)
        if match.group(1) == ADAPTER_CONFIG and match.group(2) == weights_id:
            os.replace(path, os.path.join(directory, ADAPTER_CONFIG))
        else:
            os.remove(path)


def _weights_save_id(path: str) -> Optional[str]:
    """The save id in a weights file's metadata; None for a missing or unreadable file, or one written
    before save ids existed."""
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get("save_id")
    except (OSError, safetensors.SafetensorError):
        return None


def _adapter_directory(directory: str) -> str:
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)):
        return directory
    nested = os.path.join(directory, TRAINER_ADAPTER_DIR)
    if os.path.isfile(os.path.join(nested, ADAPTER_CONFIG)):
        return nested
    raise FileNotFoundError(f"no LiME adapter in {directory}: neither {ADAPTER_CONFIG} nor {TRAINER_ADAPTER_DIR}/{ADAPTER_CONFIG}")


def _adapter_kwargs(record: dict) -> dict:
    adapter = dict(record["adapter"])
    for name in ("peft_dtype", "moe_dtype"):
        adapter[name] = _dtype_from_name(adapter[name])
    return adapter


def _options(record: dict) -> dict:
    return {**record["routing"], **_adapter_kwargs(record)}


def _build_layer(name: str, record: dict, module: nn.Module) -> LiMEModule:
    """A LiME layer like the saved one around `module` (its tensors are loaded afterwards)."""
    kwargs = _options(record)
    cls_name = record["class"]
    base = record["base"]
    if cls_name in LINEAR_CLASSES:
        if not is_wrappable_linear(module):
            raise ValueError(
                f"adapter layer {name} wraps a linear layer ({base['type']}); the model's {name} is {type(module).__name__}"
            )
        shape, saved = linear_features(module), (base["in_features"], base["out_features"])
        if shape != saved:
            raise ValueError(f"adapter layer {name}: (in_features, out_features) is {saved} in the adapter and {shape} in the model")
        if cls_name == "LiMEDoRALinear":
            kwargs["dora_detach_norm"] = record["dora_detach_norm"]
        return LINEAR_CLASSES[cls_name](module, **kwargs)
    if cls_name == "LiMEEmbedding":
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"adapter layer {name} wraps an Embedding; the model's {name} is {type(module).__name__}")
        shape, saved = (module.num_embeddings, module.embedding_dim), (base["num_embeddings"], base["embedding_dim"])
        if shape != saved:
            raise ValueError(f"adapter layer {name}: (num_embeddings, embedding_dim) is {saved} in the adapter and {shape} in the model")
        return LiMEEmbedding(module, pad_token_id=record["pad_token_id"], peft=record["peft"], **kwargs)
    raise ValueError(f"adapter layer {name}: unknown class {cls_name!r}")


def _check_tensors(name: str, layer: LiMEModule, tensors: Dict[str, torch.Tensor], new: bool) -> None:
    own = _own_tensors(layer)
    # A new layer is built from the adapter's own config: a shape that differs is the files disagreeing.
    holder = f"the layer {ADAPTER_CONFIG} describes" if new else "the model's LiME layer"
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter layer {name}: missing tensors {missing}, unexpected tensors {unexpected}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"adapter tensor {name}.{key} has shape {tuple(value.shape)} in {ADAPTER_WEIGHTS} and "
                f"{tuple(own[key].shape)} in {holder}"
            )


def load_adapter(model: nn.Module, directory: str, backend: Optional[str] = None) -> nn.Module:
    """Re-create the saved LiME layers on `model` (a fresh base model, or one already holding the
    same layers) and load their tensors; returns the model. `directory` is a `save_adapter`
    directory or a LiMETrainer output / checkpoint directory. `backend` ('auto', 'reference',
    'triton') replaces the saved one (it changes how the layers compute, not what): an adapter
    trained with backend='triton' loads on a machine without CUDA with backend='auto'.

    Every mismatch is a ValueError before the model is changed: files of two different saves, a saved
    layer with no module at its path, a module of another type or shape, a model already wrapped with
    another variant. A model of another class than the adapter's base model gets a warning naming both.
    """
    directory = _adapter_directory(directory)
    config, saved = _read_adapter(directory)
    if backend is not None:
        require_choice("backend", backend, BACKENDS)
        for record in config["layers"].values():
            record["adapter"]["backend"] = backend
        if config.get("lime_config") is not None:
            config["lime_config"] = replace(config["lime_config"], backend=backend)
    _warn_on_another_base_model(model, config.get("base_model"), directory)
    by_layer: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in config["layers"]}
    for key, value in saved.items():
        owner, _, tensor_name = key.rpartition(".")
        if owner not in by_layer:
            raise ValueError(f"adapter tensor {key} belongs to no layer of the adapter's config")
        by_layer[owner][tensor_name] = value

    # Build everything on the side first, so that a mismatch leaves the model untouched.
    with requires_grad_restored(model):
        plan = _plan(model, config, by_layer)
        if any(new for _, new in plan.values()) and any(is_dtensor(p) for p in model.parameters()):
            # FSDP manages the parameters it saw when it sharded the model: layers added later would
            # be neither sharded nor gathered.
            raise ValueError(
                f"{type(model).__name__} is sharded (DTensor parameters) but lacks the adapter's LiME layers "
                f"({sorted(name for name, (_, new) in plan.items() if new)[:3]}...): load the adapter before "
                "sharding, or shard a model that apply_peft has wrapped the same way")
    record_base_flags(model)  # once: a model already wrapped keeps the flags recorded then

    # New layers take the place of the modules they wrap, under every parent (`save_adapter` records a module
    # shared by several parents under its first name only, as `apply_peft` wraps it once).
    new_layers = {}
    for name, (layer, new) in plan.items():
        with torch.no_grad():
            for key, value in _own_tensors(layer).items():
                saved_value = by_layer[name][key]
                if is_dtensor(value):
                    from torch.distributed.tensor import distribute_tensor

                    # Every process read the whole file; each keeps its own shard of it.
                    saved_value = distribute_tensor(saved_value.to(value.device, value.dtype), value.device_mesh,
                                                    value.placements, src_data_rank=None)
                value.copy_(saved_value)
        if not new:
            # The saved routing (a schedule may have changed the temperature, say): the saved function.
            layer.update_routing(**{key: value for key, value in config["layers"][name]["routing"].items()
                                    if key not in ("num_experts", "compat")})
            continue
        if isinstance(layer, LiMEPromptEncoder):
            attach_prompt_encoder(model, layer)
        else:
            new_layers[id(model.get_submodule(name))] = layer
    replace_children(model, lambda child: new_layers.get(id(child)))
    freeze_base(model)
    _install_mask_scopes(model)
    if config.get("lime_config") is not None:
        model.lime_config = config["lime_config"]
        if model.lime_config.use_compile:  # as apply_peft(use_compile=True) left them
            for _, layer in lime_layers(model):
                layer.compile_reference()
    return model


def _read_adapter(directory: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config, tensors) of one save: the config whose save id is the weights' (the final one, or the
    staged one a save interrupted between its renames left), else a ValueError naming both ids."""
    config_path, weights_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    config = _read_config(config_path)
    tensors, metadata = _read_weights(weights_path)
    weights_id, config_id = metadata.get("save_id"), config.get("save_id")
    if weights_id == config_id:
        return config, tensors
    staged = _staged_path(directory, ADAPTER_CONFIG, weights_id) if weights_id is not None else None
    if staged is not None and os.path.isfile(staged):
        staged_config = _read_config(staged)
        if staged_config.get("save_id") == weights_id:
            warnings.warn(f"the last save to {directory} was interrupted between writing its weights and its "
                          f"config; loading that save with its config {os.path.basename(staged)} (the next "
                          "save_adapter there moves it into place)", stacklevel=3)
            return staged_config, tensors
    raise ValueError(
        f"{weights_path} and {config_path} come from different saves (save id {weights_id} and {config_id}): "
        "they do not describe one adapter. Save the adapter again, or copy both files of one save")


def _warn_on_another_base_model(model: nn.Module, saved: Optional[dict], directory: str) -> None:
    """A warning naming both models when `model` is not of the class (or sizes) the adapter was trained on;
    the layer shapes are checked anyway, but two models can share every shape and compute differently."""
    if saved is None:  # an adapter saved before base models were recorded
        return
    current = _base_model_record(model)
    differences = []
    if current["class"] != saved["class"]:
        differences.append(f"the adapter was saved from a {saved['class']}, this model is a {current['class']}")
    differences += [f"{key}: {saved['sizes'][key]} in the adapter's base model, {current['sizes'][key]} here"
                    for key in sorted(set(saved["sizes"]) & set(current["sizes"]))
                    if saved["sizes"][key] != current["sizes"][key]]
    if differences:
        warnings.warn(f"loading the LiME adapter {directory} into another base model: {'; '.join(differences)}",
                      stacklevel=3)


def saved_compat(directory: str) -> str:
    """The `compat` the adapter in `directory` (as `load_adapter` takes it) was trained with ('lime' for adapters
    saved before compat)."""
    config = _read_config(os.path.join(_adapter_directory(directory), ADAPTER_CONFIG))
    if isinstance(config.get("lime_config"), LiMEConfig):
        return config["lime_config"].compat
    return next(iter(config["layers"].values()))["routing"].get("compat", "lime")


def _read_config(path: str) -> dict:
    """The adapter's config (its lime_config as a LiMEConfig), or a ValueError naming the file and what
    is wrong with it."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid LiME adapter config (corrupt or truncated JSON: {error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != VERSION:
        found = (config.get("format"), config.get("version")) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} holds no LiME adapter of format {FORMAT} version {VERSION}; found {found!r}")
    if not isinstance(config.get("layers"), dict) or not config["layers"]:
        raise ValueError(f"{path} lists no LiME layers (its 'layers' entry is missing or empty)")
    for name, record in config["layers"].items():
        try:
            _check_record(record)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: the record of layer {name} is not one this version writes: {error}") from None
    if config.get("lime_config") is not None:
        try:
            config["lime_config"] = LiMEConfig.from_dict(config["lime_config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: its lime_config is not one this version writes: {error}") from None
    return config


# The keys each kind of layer record holds besides class, peft, routing and adapter.
_RECORD_KEYS = {
    "LiMEEmbedding": ("base", "pad_token_id"),
    "LiMEPromptEncoder": ("num_virtual_tokens", "hidden_size", "input_conditioned"),
    "LiMEDoRALinear": ("base", "dora_detach_norm"),
}


def _check_record(record: dict) -> None:
    """A TypeError or ValueError unless `record` is a layer record `_layer_record` could have written."""
    if not isinstance(record, dict):
        raise TypeError(f"a record is a JSON object; got {type(record).__name__}")
    cls_name = record.get("class")
    if cls_name not in {cls.__name__ for cls in SAVED_CLASSES}:
        raise ValueError(f"unknown class {cls_name!r}")
    expected = {"class", "peft", "routing", "adapter", *_RECORD_KEYS.get(cls_name, ("base",))}
    missing, unknown = sorted(expected - set(record)), sorted(set(record) - expected)
    if missing or unknown:
        raise ValueError(f"missing keys {missing}, unknown keys {unknown}")
    if "base" in record:
        shape_keys = ("num_embeddings", "embedding_dim") if cls_name == "LiMEEmbedding" else ("in_features", "out_features")
        missing = sorted({"type", *shape_keys} - set(record["base"]))
        if missing:
            raise ValueError(f"its base lacks {missing}")
    # The options' own checks: unknown fields and invalid values.
    RoutingOptions(**record["routing"])
    AdapterOptions(**_adapter_kwargs(record))


def _read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The adapter's tensors and the file's metadata, or an error naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the LiME adapter's weights are missing: {path}")
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except safetensors.SafetensorError as error:
        size = os.path.getsize(path)
        raise ValueError(
            f"{path} ({size} bytes) is not a readable safetensors file, corrupt or truncated: {error}"
        ) from None


def _plan(model: nn.Module, config: dict, by_layer: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Tuple[LiMEModule, bool]]:
    """For each saved layer: (the LiME layer to load, whether it is new), every check done."""
    plan: Dict[str, Tuple[LiMEModule, bool]] = {}
    for name, record in config["layers"].items():
        if record["class"] == "LiMEPromptEncoder":
            existing = getattr(model, "lime_prompt_encoder", None)
            if existing is not None:
                _check_same_settings(name, record, existing)
                layer, new = existing, False
            else:
                device = model.get_input_embeddings().weight.device
                layer = LiMEPromptEncoder(record["num_virtual_tokens"], record["hidden_size"],
                                          input_conditioned=record["input_conditioned"], device=device,
                                          prompt_dropout=record["adapter"].get("dropout", 0.0),
                                          **{k: v for k, v in _options(record).items()
                                             if k not in ("rank", "alpha", "dropout")})
                new = True
        else:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"adapter layer {name}: {type(model).__name__} has no module at that path") from None
            if isinstance(module, LiMEModule):
                if _class_name(module) != record["class"] or module.peft != record["peft"]:
                    raise ValueError(
                        f"adapter layer {name} is a {record['class']} (peft={record['peft']!r}); the model's is a "
                        f"{_class_name(module)} (peft={module.peft!r})"
                    )
                _check_same_settings(name, record, module)
                layer, new = module, False
            else:
                layer, new = _build_layer(name, record, module), True
        _check_tensors(name, layer, by_layer[name], new)
        plan[name] = (layer, new)
    return plan


# Settings that do not change what a layer computes: whether it records statistics, which backend
# computes it, how its experts were initialized, the type of the frozen layer it wraps (an adapter
# trained over a bf16 layer loads over a quantized one).
_NOT_COMPARED = {"track_aux", "backend", "LiME_init_std", "type"}


def _check_same_settings(name: str, record: dict, layer: LiMEModule) -> None:
    """A ValueError naming every saved setting the model's existing LiME layer does not share and
    `load_adapter` cannot switch (the routing options are runtime switches, set from the record):
    loading only the tensors would give another function than the saved one."""
    current = _layer_record(layer)
    differences = []
    # compat is not a runtime switch: it shapes some variants' parameters (adapters saved before it are 'lime').
    saved_compat = record["routing"].get("compat", "lime")
    if saved_compat != layer.compat:
        differences.append(f"routing.compat: adapter {saved_compat!r}, model {layer.compat!r}")
    for key in sorted(set(record) - {"routing"}):
        saved, own = record[key], current.get(key)
        if isinstance(saved, dict) and isinstance(own, dict):
            differences += [f"{key}.{field}: adapter {saved.get(field)!r}, model {own.get(field)!r}"
                            for field in sorted(set(saved) | set(own))
                            if field not in _NOT_COMPARED and saved.get(field) != own.get(field)]
        elif saved != own:
            differences.append(f"{key}: adapter {saved!r}, model {own!r}")
    if differences:
        raise ValueError(
            f"adapter layer {name}: the model's LiME layer there is set up differently "
            f"({'; '.join(differences)}); load into a fresh base model (or remove_lime(model) first) to get "
            "the saved layer")
