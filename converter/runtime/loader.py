"""load_quantized(): a pre-quantized bitsandbytes-format checkpoint -> a ready transformers model, without
bitsandbytes.

Steps: config -> model skeleton with parameters on the meta device -> every linear module whose weight
is quantized *in the checkpoint* (decided per key by `bnb.quantized_prefixes`, never by name rules)
becomes a Linear4bit/Linear8bit -> shards are read one at a time with `safetensors.safe_open` (no
pickle, ever) and each tensor is assigned as soon as it is read -> weights tied -> eval mode.
Anything that does not match (missing/extra tensors, shapes, quant types) raises one ModelLoadError line
naming the tensor.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..bnb.state_dict import from_bnb_state_dict, quantized_prefixes
from ..errors import ModelLoadError, StateDictError
from . import functional as rf
from .modules import Linear4bit, Linear8bit

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files a Hub snapshot needs for loading (weights, configs, tokenizer).
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]


def _download_snapshot(repo_id: str, revision: str | None) -> str:
    """Hub repo id -> local snapshot folder in the user's Hugging Face cache (reused by later loads).
    Shards are kept, not deleted after use as the converter does: loaded tensors are views of each
    shard's memory map (safetensors' get_tensor does not copy)."""
    from ..sources.hub import snapshot

    return snapshot(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)


def _resolve(path_or_repo, revision) -> str:
    path = os.fspath(path_or_repo)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelLoadError(f"{path}: expected a checkpoint folder (config.json + safetensors), got a file")
    return _download_snapshot(path, revision)


def _read_config(folder: str) -> dict:
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{cfg_path}: missing (a quantized checkpoint needs its config.json)") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{cfg_path}: not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path}: not a JSON object")
    return cfg


def _shard_files(folder: str) -> list:
    index = os.path.join(folder, _INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from None
        files = []
        for name in dict.fromkeys(weight_map.values()):
            full = os.path.normpath(os.path.join(folder, name))
            if os.path.dirname(full) != os.path.normpath(folder) or not os.path.isfile(full):
                raise ModelLoadError(f"{index}: shard {name!r} is missing or outside the folder")
            files.append(full)
        return files
    single = os.path.join(folder, _SINGLE)
    if os.path.isfile(single):
        return [single]
    raise ModelLoadError(f"{folder}: no {_SINGLE} or {_INDEX}")


def _headers(files: list) -> dict:
    """{tensor name: (file, shape)} from the shard headers only (no tensor data is read)."""
    from safetensors import safe_open

    where = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key in where:
                        raise ModelLoadError(f"{key}: stored in both {where[key][0]} and {file}")
                    where[key] = (file, tuple(f.get_slice(key).get_shape()))
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error type for broken headers
            raise ModelLoadError(f"{file}: corrupted safetensors file ({exc})") from None
    return where


def _torch_dtype(name, what: str):
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ModelLoadError(f"{what}: unsupported dtype {name!r} (expected float32, float16 or bfloat16)")
    return _DTYPES[name]


def _build_skeleton(folder: str, cfg: dict, trust_remote_code: bool):
    import transformers
    from accelerate import init_empty_weights

    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ModelLoadError(f"{folder}/config.json: {str(exc).splitlines()[0]}") from None
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    # Parameters on meta; buffers (rotary tables) are computed for real, since nothing stores them.
    with init_empty_weights(include_buffers=False):
        if cls is not None:
            return cls(config)
        if trust_remote_code and getattr(config, "auto_map", None):
            return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        if not archs:  # no class named: the causal-LM class registered for model_type
            try:
                return transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:
                pass
    raise ModelLoadError(
        f"{folder}/config.json: architecture {archs[0] if archs else None!r} is not in transformers "
        "(remote code runs only with trust_remote_code=True)"
    )


def _quant_settings(cfg: dict) -> dict:
    qc = cfg.get("quantization_config") or {}
    if qc and qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        raise ModelLoadError(f"config.json: quant_method {qc.get('quant_method')!r} is not bitsandbytes")
    return {
        "compute_dtype_4bit": _torch_dtype(qc.get("bnb_4bit_compute_dtype") or "float32", "bnb_4bit_compute_dtype"),
        "threshold": float(qc.get("llm_int8_threshold", 6.0) or 0.0),
    }


def _linear_features(module: nn.Module, prefix: str, name: str) -> tuple:
    """(in_features, out_features) of a module a quantized weight may replace.

    nn.Linear (exact type), or GPT-2's Conv1D: it stores its weight (in, out) and computes x @ W + b,
    and the checkpoint holds that weight transposed to (out, in) (the converter and transformers + bnb
    both transpose before quantizing), so a Linear over it computes the same x @ W + b."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.nx, module.nf
    raise ModelLoadError(
        f"{prefix}weight: quantized, but {name} is a {type(module).__name__}, not nn.Linear or Conv1D"
    )


def _replace_quantized_modules(model: nn.Module, quantized: dict, settings: dict, dtype, stored_dtype):
    """Swap nn.Linear / Conv1D -> Linear4bit/Linear8bit for every prefix the checkpoint quantizes. 4-bit layers
    compute in the config's compute dtype; int8 layers in the dtype of the surrounding activations."""
    workspace = rf.Workspace()
    for prefix, kind in quantized.items():
        name = prefix[:-1]
        if kind not in ("nf4", "fp4", "int8"):
            key = f"{prefix}weight.quant_state.bitsandbytes__{kind}" if kind != "int8" else prefix + "SCB"
            raise ModelLoadError(f"{key}: unknown quant type {kind!r} (expected nf4, fp4 or int8)")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"{prefix}weight: the model has no module {name!r}") from None
        in_features, out_features = _linear_features(old, prefix, name)
        has_bias = old.bias is not None
        if kind == "int8":
            compute = dtype or stored_dtype or torch.float32
            new = Linear8bit(in_features, out_features, has_bias, compute_dtype=compute, device="meta",
                             threshold=settings["threshold"])
        else:
            compute = dtype or settings["compute_dtype_4bit"]
            new = Linear4bit(in_features, out_features, has_bias, compute_dtype=compute, device="meta",
                             workspace=workspace)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _owner(model: nn.Module, key: str):
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None, attr
    if attr in module._parameters or (attr in module._buffers and attr not in module._non_persistent_buffers_set):
        return module, attr
    return None, attr


def _assign_plain(model, key, tensor, dtype, device):
    module, attr = _owner(model, key)
    if module is None:
        raise ModelLoadError(f"{key}: unexpected tensor (the model built from config.json has no such parameter)")
    current = module._parameters.get(attr) if attr in module._parameters else module._buffers[attr]
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise ModelLoadError(
            f"{key}: shape {list(tensor.shape)} does not match the config's {list(current.shape)}"
        )
    if isinstance(module, (Linear4bit, Linear8bit)) and attr == "bias":
        tensor = tensor.to(module.compute_dtype)
    elif dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    tensor = tensor.to(device)
    if attr in module._parameters:
        trains = current.requires_grad if current is not None else False
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=trains)
    else:
        module._buffers[attr] = tensor


def _expected_plain_keys(model) -> set:
    keys = set()
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        quantized = isinstance(module, (Linear4bit, Linear8bit))
        for attr, p in module._parameters.items():
            if p is not None:
                keys.add(prefix + attr)
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set and not quantized:
                keys.add(prefix + attr)
    return keys


def _tied_targets(model) -> set:
    """Parameter names transformers ties to another (lm_head.weight -> embed_tokens.weight): a
    checkpoint may omit them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied)


def _quantized_owner(key: str, quantized: dict):
    """The quantized module prefix that `key` belongs to (its bias excluded), or None."""
    candidates = [key.rsplit(".", 1)[0] + "." if "." in key else ""]
    if ".weight." in key:
        candidates.append(key.rsplit(".weight.", 1)[0] + ".")
    for prefix in candidates:
        kind = quantized.get(prefix)
        if kind is None:
            continue
        owns = Linear8bit._owns if kind == "int8" else Linear4bit._owns
        if owns(key[len(prefix):]):
            return prefix
    return None


def _load_tensors(model, where: dict, quantized: dict, dtype, device):
    from safetensors import safe_open

    by_prefix = {key: p for key in where if (p := _quantized_owner(key, quantized)) is not None}
    pending_keys: dict = {prefix: set() for prefix in quantized}
    for key, prefix in by_prefix.items():
        pending_keys[prefix].add(key)
    collected: dict = {prefix: {} for prefix in quantized}
    files = list(dict.fromkeys(file for file, _ in where.values()))
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except Exception as exc:
            raise ModelLoadError(f"{file}: corrupted safetensors file ({exc})") from None
        with handle as f:
            for key in f.keys():
                try:
                    tensor = f.get_tensor(key)
                except Exception as exc:
                    raise ModelLoadError(f"{key}: cannot read from {file} ({exc})") from None
                prefix = by_prefix.get(key)
                if prefix is None:
                    _assign_plain(model, key, tensor, dtype, device)
                    continue
                collected[prefix][key] = tensor
                if collected[prefix].keys() == pending_keys[prefix]:
                    _install_quantized(model, prefix, collected.pop(prefix), device)


def _install_quantized(model, prefix, state: dict, device):
    try:
        qt = from_bnb_state_dict(state, prefix)
    except StateDictError as exc:
        raise ModelLoadError(str(exc)) from None
    module = model.get_submodule(prefix[:-1])
    if module.weight is not None:
        raise ModelLoadError(f"{prefix}weight: loaded twice")
    # Any key the parser did not consume is not part of a bnb state: reject rather than ignore it.
    known = set(qt.state_dict(prefix)) | {prefix + "weight_format"}
    extra = sorted(set(state) - known)
    if extra:
        raise ModelLoadError(f"{extra[0]}: unexpected tensor in a quantized module's state")
    module.set_quantized(qt.to(device) if device is not None else qt, prefix + "weight")


def _check_complete(model, quantized: dict):
    for prefix in quantized:
        module = model.get_submodule(prefix[:-1])
        if not module.is_loaded:
            raise ModelLoadError(f"{prefix}weight: quantized state incomplete in the checkpoint")
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.device.type == "meta":
            raise ModelLoadError(f"{name}: missing from the checkpoint")


def load_quantized(path_or_repo, *, device=None, dtype=None, revision=None, device_map=None,
                   trust_remote_code=False):
    """Load a bitsandbytes-format checkpoint (written by `qckpt convert` or by transformers + bitsandbytes).

    device: where tensors go (default CPU). dtype: compute dtype of the quantized layers and dtype of
    every other floating tensor (default: the config's bnb_4bit_compute_dtype for 4-bit layers, the
    stored dtypes elsewhere). device_map="auto" spreads the loaded layers with accelerate.
    Returns the model in eval mode.
    """
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    dtype = _torch_dtype(dtype, "dtype")
    device = torch.device(device) if device is not None else torch.device("cpu")
    folder = _resolve(path_or_repo, revision)
    cfg = _read_config(folder)
    settings = _quant_settings(cfg)
    where = _headers(_shard_files(folder))
    quantized = quantized_prefixes(where)
    model = _build_skeleton(folder, cfg, trust_remote_code)
    stored = _torch_dtype(cfg.get("dtype") or cfg.get("torch_dtype"), "config.json dtype")
    _replace_quantized_modules(model, quantized, settings, dtype, stored)

    expected = _expected_plain_keys(model)
    tied = _tied_targets(model)
    quant_keys = {k for k in where if _quantized_owner(k, quantized) is not None}
    for key in sorted(where):
        if key in quant_keys:
            continue
        if key not in expected:
            raise ModelLoadError(
                f"{key}: unexpected tensor (not a parameter of the {type(model).__name__} built from config.json)"
            )
    for key in sorted(expected - set(where) - tied):
        raise ModelLoadError(f"{key}: missing from the checkpoint")

    _load_tensors(model, where, quantized, dtype, device)
    model.tie_weights()
    _check_complete(model, quantized)
    model.to(device)  # non-persistent buffers (rotary tables) were built on the CPU
    model.eval()
    if device_map is not None:
        model = _dispatch(model, device_map)
    return model


def _dispatch(model, device_map):
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(model, no_split_module_classes=no_split)
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be 'auto' or a dict, got {device_map!r}")
    if set(device_map.values()) <= {"cpu", torch.device("cpu")}:
        return model
    return dispatch_model(model, device_map=device_map)
