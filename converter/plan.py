"""Which tensors are quantized, decided from headers and config.json before any tensor data is read.

The rule is transformers' own (FORMAT.md 5.2): build the model skeleton on the meta device, take every
`nn.Linear` (exact type) and GPT-2 `Conv1D`, drop what transformers would skip (tied weights, the output
embedding, the last module, `_keep_in_fp32_modules`), then the user's --skip globs. When the result is
not what transformers' default (llm_int8_skip_modules=None) would pick, every unquantized linear module is
listed explicitly, and the list is checked by running transformers' matcher on it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os

from .errors import CheckpointError
from .shards.header import TensorInfo

FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """What happens to one source tensor."""

    name: str
    shard: str  # the source shard (file name within the source)
    info: TensorInfo
    quantize: bool
    transpose: bool = False  # Conv1D stores (in, out); bitsandbytes wants (out, in)

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name


@dataclasses.dataclass(frozen=True)
class Plan:
    tensors: tuple  # TensorPlan in processing order: source shard order, then file offset
    skip_modules: list | None  # value for llm_int8_skip_modules
    model_class: str | None  # the transformers class the skeleton was built with (None: no config)

    @property
    def quantized(self) -> list:
        return [t for t in self.tensors if t.quantize]


def _matches(name: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name, g + ".*") for g in globs)


def build_skeleton(config_dir: str):
    """(model on the meta device, its class name) from config.json; never runs remote code."""
    import torch
    import transformers

    # config validation warnings (e.g. token ids outside a tiny vocab) are not ours to print
    tf_logger = logging.getLogger("transformers")
    saved_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        try:
            config = transformers.AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad or unsupported config
            raise CheckpointError(f"{os.path.join(config_dir, 'config.json')}: cannot be read by transformers "
                                  f"({exc})") from None
        candidates = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
        candidates = [c for c in candidates if c is not None]
        # dtype=None: otherwise transformers switches torch's *process-wide* default dtype to the config's
        # while it builds the model, and this runs in a thread beside the conversion (PendingPlan). The
        # module structure, which is all the plan reads, does not depend on the dtype. The meta device
        # context is thread-local.
        with torch.device("meta"):
            if candidates:
                return candidates[0]._from_config(config, dtype=None), candidates[0].__name__
            for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
                try:
                    model = auto.from_config(config, dtype=None)
                    return model, type(model).__name__
                except ValueError:
                    continue
    finally:
        tf_logger.setLevel(saved_level)
    raise CheckpointError(f"{config_dir}/config.json: no transformers model class for model_type "
                          f"{getattr(config, 'model_type', None)!r}")


def _linear_modules(model) -> dict:
    """{module name: is Conv1D} for every module transformers' bnb replacement would consider."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return {
        name: isinstance(module, Conv1D)
        for name, module in model.named_modules()
        if isinstance(module, Conv1D) or type(module) is nn.Linear
    }


def _replaced(linear, patterns) -> set:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return {name for name in linear if should_convert_module(name, patterns)}


def plan_with_config(infos: list, config_dir: str, skip_globs=()) -> Plan:
    """infos: [(shard, TensorInfo)] in processing order."""
    from transformers.quantizers.base import HfQuantizer

    model, class_name = build_skeleton(config_dir)
    linear = _linear_modules(model)
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    default_skip = HfQuantizer.get_modules_to_not_convert(model, None, keep_fp32 or None)
    default_set = _replaced(linear, default_skip)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def to_model_name(module: str):
        for candidate in (module, f"{prefix}.{module}" if prefix else None,
                          module[len(prefix) + 1:] if prefix and module.startswith(prefix + ".") else None):
            if candidate is not None and candidate in linear:
                return candidate
        return None

    chosen = {}  # model module name -> checkpoint tensor name
    tensors = []
    for shard, info in infos:
        quantize = transpose = False
        if info.name.endswith(".weight") and len(info.shape) == 2:
            module = info.name[: -len(".weight")]
            model_name = to_model_name(module)
            if (model_name is not None and model_name in default_set
                    and not _matches(module, skip_globs) and not _matches(model_name, skip_globs)):
                if info.dtype not in FLOAT_DTYPES:
                    raise CheckpointError(f"{shard}: tensor {info.name!r} has dtype {info.dtype}; "
                                          "only F32/F16/BF16 weights can be quantized")
                quantize, transpose = True, linear[model_name]
                chosen[model_name] = info.name
        tensors.append(TensorPlan(info.name, shard, info, quantize, transpose))
    quantized_modules = set(chosen)
    skip_modules = None
    if quantized_modules != default_set:
        skip_modules = sorted(set(linear) - quantized_modules)
        got = _replaced(linear, skip_modules + keep_fp32)
        if got != quantized_modules:
            raise CheckpointError(
                "cannot express the quantized module set in llm_int8_skip_modules "
                f"(mismatch on {sorted(got ^ quantized_modules)[:5]})"
            )
    return Plan(tuple(tensors), skip_modules, class_name)


_NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "norm", "ln_", "shared")


def plan_without_config(infos: list, skip_globs=()) -> Plan:
    """A bare .safetensors file with no config.json: quantize 2-D float `*.weight` tensors that are not
    embeddings, norms or an output head, by name (no model to ask)."""
    tensors = []
    for shard, info in infos:
        module = info.name[: -len(".weight")] if info.name.endswith(".weight") else None
        quantize = bool(
            module is not None and len(info.shape) == 2 and info.dtype in FLOAT_DTYPES
            and not any(part in module.lower() for part in _NOT_LINEAR) and not _matches(module, skip_globs)
        )
        tensors.append(TensorPlan(info.name, shard, info, quantize))
    return Plan(tuple(tensors), None, None)


class PendingPlan:
    """transformers' plan (plan_with_config) built in a background thread while the caller starts work on a
    name-based guess (plan_without_config).

    Building the skeleton means importing transformers' model code: seconds of a conversion that otherwise
    takes a few more. The guess is right for the usual decoder LLMs (Linear weights quantized; embeddings,
    norms, lm_head kept). Work done on it may be kept only once `confirmed()` says the real plan is
    identical tensor for tensor (name, shard, quantize, transpose); otherwise the caller redoes it with the
    real plan, so the output never depends on the guess.
    """

    def __init__(self, infos: list, config_dir: str, skip_globs=()):
        import concurrent.futures
        import time

        self.guess = plan_without_config(infos, skip_globs)
        self.seconds = None  # how long the real plan took to build, in its thread

        def build():
            t0 = time.perf_counter()
            try:
                return plan_with_config(infos, config_dir, skip_globs)
            finally:
                self.seconds = time.perf_counter() - t0

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qckpt-plan")
        self._future = pool.submit(build)
        pool.shutdown(wait=False)

    def result(self) -> Plan:
        """The real plan (waits for it; raises its errors, e.g. an unreadable config.json)."""
        return self._future.result()

    def confirmed(self) -> bool:
        return self.result().tensors == self.guess.tensors


def predicted_bytes(tp: TensorPlan, quant: str, blocksize: int, double_quant: bool) -> int:
    """Output bytes of one source tensor, from its shape (the quant-state JSON is estimated)."""
    from .formats.codebooks import NESTED_BLOCKSIZE

    if not tp.quantize:
        return tp.info.nbytes
    numel = tp.info.numel
    if quant == "int8":
        return numel + 4 * tp.info.shape[0] + 1
    nb = -(-numel // blocksize)
    total = (numel + 1) // 2 + 16 * 4 + 200
    if double_quant:
        total += nb + 4 * -(-nb // NESTED_BLOCKSIZE) + 256 * 4
    else:
        total += 4 * nb
    return total


def assign_shards(plan: Plan, quant: str, blocksize: int, double_quant: bool, max_shard_size: int) -> list:
    """Output shard index per plan tensor: greedy in processing order, a new shard when the next tensor
    would overflow max_shard_size (a single bigger tensor gets a shard of its own)."""
    out, current, used = [], 0, 0
    for tp in plan.tensors:
        size = predicted_bytes(tp, quant, blocksize, double_quant)
        if used and used + size > max_shard_size:
            current, used = current + 1, 0
        out.append(current)
        used += size
    return out
