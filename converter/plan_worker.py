"""transformers' plan (plan.plan_with_config) built in a child process: `python -m converter.plan_worker`.

Why a process: building the skeleton imports transformers' model code, seconds of pure-Python work. In a
thread it shares the GIL with the conversion loop, and both slowed down; on an H100 a 3 GB conversion
waited 4.5 s for a plan that took 10.4 s in its thread. A child runs on another core.

Protocol: one JSON request on stdin ({"config_dir", "skip", "infos": [[shard, name, dtype, shape, start,
end], ...]}), one JSON reply on stdout: {"plan": {...}} or {"error": message, "checkpoint_error": bool}.
Only JSON crosses the pipe: nothing is unpickled.
"""
from __future__ import annotations

import json
import sys


def infos_to_json(infos: list) -> list:
    return [[shard, i.name, i.dtype, list(i.shape), i.start, i.end] for shard, i in infos]


def infos_from_json(rows: list) -> list:
    from .shards.header import TensorInfo

    return [(shard, TensorInfo(name, dtype, tuple(shape), start, end)) for shard, name, dtype, shape, start, end in rows]


def plan_to_json(plan) -> dict:
    return {
        "tensors": [[t.shard, t.info.name, t.info.dtype, list(t.info.shape), t.info.start, t.info.end, t.quantize,
                     t.transpose] for t in plan.tensors],
        "skip_modules": plan.skip_modules,
        "model_class": plan.model_class,
    }


def plan_from_json(data: dict):
    from .plan import Plan, TensorPlan
    from .shards.header import TensorInfo

    tensors = tuple(TensorPlan(name, shard, TensorInfo(name, dtype, tuple(shape), start, end), quantize, transpose)
                    for shard, name, dtype, shape, start, end, quantize, transpose in data["tensors"])
    return Plan(tensors, data["skip_modules"], data["model_class"])


def main() -> int:
    from .errors import CheckpointError
    from .plan import plan_with_config

    request = json.load(sys.stdin)
    try:
        plan = plan_with_config(infos_from_json(request["infos"]), request["config_dir"], tuple(request["skip"]))
        reply = {"plan": plan_to_json(plan)}
    except CheckpointError as e:
        reply = {"error": str(e), "checkpoint_error": True}
    except Exception as e:  # reported by the parent, which raises it there
        reply = {"error": f"{type(e).__name__}: {e}", "checkpoint_error": False}
    json.dump(reply, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
