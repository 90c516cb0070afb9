"""`inspect`: describe a quantized checkpoint from its headers and small files only (no tensor data).

Works on any bitsandbytes-format checkpoint (qckpt's, transformers', unsloth's...), local or on the Hub.
For a Hub repo only config/index/report/README are downloaded and each shard header is read with ranged
requests (sources.hub owns the Hub access), so inspecting a 70B repo costs a few hundred kilobytes.

What a header alone cannot say is derived: a 4-bit weight's element count is twice its packed bytes (exact
for even counts, which every real Linear has) and its blocksize is numel / len(absmax) rounded to a power of
two. A local folder also has its quant-state JSON blobs read (a few hundred bytes each) for exact values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from .errors import CheckpointError, SourceNotFoundError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
REPORT_FILE = "qckpt_report.json"
README_FILE = "README.md"
_QUANT_STATE_MARK = "weight.quant_state.bitsandbytes__"
_MODULE_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                    "weight_format", "SCB", "weight")
_LAYER = re.compile(r"\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class TensorGroup:
    """Tensors of one kind across layers (`model.layers.*.mlp.down_proj`), summed."""

    name: str
    scheme: str  # nf4 | fp4 | int8 | the stored dtype for unquantized tensors
    count: int
    params: int
    bytes: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclasses.dataclass(frozen=True)
class Inspection:
    """Everything `qckpt inspect` prints; `to_dict()` is the --json form."""

    location: str
    kind: str  # "local" | "hub"
    commit: str | None
    architecture: dict
    quantization: dict  # quantization_config as stored (empty when unquantized)
    quant_types: tuple  # scheme names found in the weights
    blocksizes: tuple  # 4-bit blocksizes found
    quantized_modules: tuple  # module names
    unquantized_tensors: tuple  # tensor names kept in their source dtype
    groups: tuple  # of TensorGroup
    layers: tuple  # per layer index: {"layer", "bytes", "params", "rel_error_mean", "rel_error_max"}
    shards: tuple  # shard file names
    file_bytes: int  # size of the shard files
    tensor_bytes: int
    params: int
    params_exact: bool
    provenance: dict
    errors: dict | None  # summary of the report's per-tensor errors

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.params

    @property
    def bits_per_param(self) -> float:
        return 8 * self.tensor_bytes / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["groups"] = [dict(dataclasses.asdict(g), bits_per_param=g.bits_per_param) for g in self.groups]
        out["fp16_bytes"] = self.fp16_bytes
        out["bits_per_param"] = self.bits_per_param
        out["compression_vs_fp16"] = self.fp16_bytes / self.tensor_bytes if self.tensor_bytes else 0.0
        for key in ("quant_types", "blocksizes", "quantized_modules", "unquantized_tensors", "layers", "shards"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Inspection":
        """Inverse of to_dict (derived figures are recomputed, not read)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["groups"] = tuple(TensorGroup(**{k: g[k] for k in ("name", "scheme", "count", "params", "bytes")})
                                 for g in data["groups"])
        for key in ("quant_types", "blocksizes", "quantized_modules", "unquantized_tensors", "layers", "shards"):
            values[key] = tuple(values[key])
        return cls(**values)


class LocalRepo:
    """A converted folder on disk, read the way the Hub view is: listing, small files, headers."""

    kind = "local"
    commit = None

    def __init__(self, path: str):
        self.folder = os.path.abspath(path)
        self.location = self.folder

    def files(self) -> dict:
        out = {}
        for root, dirs, names in os.walk(self.folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                full = os.path.join(root, name)
                out[os.path.relpath(full, self.folder).replace(os.sep, "/")] = os.path.getsize(full)
        return out

    def read_small(self, name: str) -> bytes | None:
        path = os.path.join(self.folder, name)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    def header(self, shard: str):
        from .shards.reader import read_header

        return read_header(os.path.join(self.folder, shard), shard)

    def quant_states(self, shard: str, names) -> dict:
        """name -> parsed quant-state JSON of each blob in `names` (tiny reads)."""
        from .shards.reader import SafetensorsFile

        out = {}
        with SafetensorsFile(os.path.join(self.folder, shard), shard) as f:
            for name in names:
                try:
                    out[name] = json.loads(bytes(f.read(name).reshape(-1).tolist()).decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    continue  # a broken blob is verify's business; inspect falls back to derived values
        return out

    def close(self) -> None:
        pass


def open_repo(path_or_repo, *, revision=None, token=None):
    """A local folder wins; otherwise a Hub repo id, read through sources.hub."""
    text = os.fspath(path_or_repo)
    if os.path.isdir(text):
        return LocalRepo(text)
    if os.path.exists(text):
        raise SourceNotFoundError(f"{text}: inspect expects a checkpoint folder or a Hub repo id, not a file")
    return HubRepo(text, revision=revision, token=token)


class HubRepo:
    """A Hub repo pinned to one commit: the listing from model_info, small files downloaded into a temporary
    folder, shard headers by ranged reads (all through sources.hub, the module that owns Hub access)."""

    kind = "hub"

    def __init__(self, repo_id: str, *, revision=None, token=None):
        import tempfile

        from .sources.hub import HubSource

        self._tmp = tempfile.TemporaryDirectory(prefix="qckpt-inspect-")
        try:
            self._source = HubSource(repo_id, revision=revision, token=token, work_dir=self._tmp.name)
        except BaseException:
            self._tmp.cleanup()
            raise
        self.commit = self._source.commit
        self.location = repo_id

    def files(self) -> dict:
        return {name: size or 0 for name, (size, _) in self._source.files.items()}

    def read_small(self, name: str) -> bytes | None:
        if name not in self._source.files:
            return None
        with open(self._source.download_small(name), "rb") as f:
            return f.read()

    def header(self, shard: str):
        return self._source.header(shard)

    def close(self) -> None:
        self._source.close()
        self._tmp.cleanup()


def _json(repo, name: str):
    raw = repo.read_small(name)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{repo.location}/{name}: not valid JSON ({exc})") from None


def inspect(path_or_repo, *, revision: str | None = None, token=None) -> Inspection:
    """Describe the checkpoint at `path_or_repo` (local folder or Hub repo id) from headers and small files."""
    repo = open_repo(path_or_repo, revision=revision, token=token)
    try:
        return _inspect(repo)
    finally:
        repo.close()


def _inspect(repo) -> Inspection:
    from .bnb.state_dict import quantized_prefixes

    files = repo.files()
    config = _json(repo, CONFIG_FILE) or {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{repo.location}/{CONFIG_FILE}: not a JSON object")
    index = _json(repo, INDEX_FILE) if INDEX_FILE in files else None
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        from .shards.index import check_shard_name

        shards = sorted(set(index["weight_map"].values()))
        for shard in shards:  # a crafted index must not make us read files outside the checkpoint
            check_shard_name(shard, f"{repo.location}/{INDEX_FILE}")
    elif SINGLE_FILE in files:
        shards = [SINGLE_FILE]
    else:
        shards = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)
    if not shards:
        raise CheckpointError(f"{repo.location}: no safetensors weights (neither {INDEX_FILE} nor {SINGLE_FILE})")
    report = _json(repo, REPORT_FILE) if REPORT_FILE in files else None
    report = report if isinstance(report, dict) else None

    infos = {}  # name -> (shard, TensorInfo)
    for shard in shards:
        for info in repo.header(shard).tensors:
            infos[info.name] = (shard, info)
    prefixes = quantized_prefixes(infos)
    states = _quant_states(repo, infos, prefixes)
    modules, exact = _module_facts(infos, prefixes, states, report)
    groups, layers = _groups(infos, prefixes, modules, report)
    params = sum(g.params for g in groups)
    tensor_bytes = sum(g.bytes for g in groups)
    qconfig = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    claimed = set(_owners(infos, prefixes))
    return Inspection(
        location=repo.location, kind=repo.kind, commit=repo.commit,
        architecture=_architecture(config),
        quantization=dict(qconfig),
        quant_types=tuple(sorted({m["scheme"] for m in modules.values()})),
        blocksizes=tuple(sorted({m["blocksize"] for m in modules.values() if m.get("blocksize")})),
        quantized_modules=tuple(p[:-1] if p.endswith(".") else p for p in sorted(prefixes)),
        unquantized_tensors=tuple(sorted(set(infos) - claimed)),
        groups=tuple(groups), layers=tuple(layers), shards=tuple(shards),
        file_bytes=sum(files.get(s, 0) for s in shards), tensor_bytes=tensor_bytes, params=params,
        params_exact=exact, provenance=_provenance(report, repo), errors=_error_summary(report),
    )


def _owners(infos, prefixes: dict) -> dict:
    """tensor name -> the quantized module prefix it belongs to (bitsandbytes' key layout)."""
    out = {}
    for name in infos:
        if _QUANT_STATE_MARK in name:
            prefix = name.split(_QUANT_STATE_MARK)[0]
            if prefix in prefixes:
                out[name] = prefix
            continue
        for suffix in _MODULE_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in prefixes:
                out[name] = name[: -len(suffix)]
                break
    return out


def _quant_states(repo, infos: dict, prefixes: dict) -> dict:
    """prefix -> quant-state JSON, where the repo can read blobs cheaply (local folders)."""
    reader = getattr(repo, "quant_states", None)
    if reader is None:
        return {}
    by_shard = {}
    for prefix, kind in prefixes.items():
        if kind == "int8":
            continue
        name = f"{prefix}{_QUANT_STATE_MARK}{kind}"
        if name in infos:
            by_shard.setdefault(infos[name][0], []).append(name)
    out = {}
    for shard, names in by_shard.items():
        for name, state in reader(shard, names).items():
            out[name.split(_QUANT_STATE_MARK)[0]] = state
    return out


def _module_facts(infos: dict, prefixes: dict, states: dict, report) -> tuple[dict, bool]:
    """prefix -> {"scheme", "params", "blocksize"}; and whether every count is exact."""
    recorded = {}
    if report is not None and isinstance(report.get("tensors"), list):
        recorded = {t.get("name"): t for t in report["tensors"] if isinstance(t, dict)}
    exact = True
    out = {}
    for prefix, kind in prefixes.items():
        weight = infos.get(f"{prefix}weight")
        if weight is None:
            continue
        info = weight[1]
        if kind == "int8":
            out[prefix] = {"scheme": "int8", "params": info.numel, "blocksize": None}
            continue
        state = states.get(prefix)
        record = recorded.get(f"{prefix}weight")
        if isinstance(state, dict) and isinstance(state.get("shape"), list):
            params = math.prod(state["shape"])
        elif isinstance(record, dict) and isinstance(record.get("shape"), list):
            params = math.prod(record["shape"])
        else:
            params = 2 * info.nbytes  # packed nibbles: exact for an even element count
            exact = False
        blocksize = state.get("blocksize") if isinstance(state, dict) else None
        absmax = infos.get(f"{prefix}weight.absmax")
        if blocksize is None and absmax is not None and absmax[1].numel:
            blocksize = 2 ** round(math.log2(params / absmax[1].numel)) if params else None
        out[prefix] = {"scheme": kind, "params": params, "blocksize": blocksize}
    return out, exact


def _group_name(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)  # every index: layers and experts alike


def _layer_of(name: str):
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _groups(infos: dict, prefixes: dict, modules: dict, report) -> tuple[list, list]:
    owner = _owners(infos, prefixes)
    groups = {}  # (group, scheme) -> [count, params, bytes]
    layers = {}  # layer -> {"bytes", "params", "errors"}
    for name, (_, info) in infos.items():
        prefix = owner.get(name)
        if prefix is not None:
            module = prefix[:-1] if prefix.endswith(".") else prefix
            facts = modules.get(prefix, {"scheme": prefixes[prefix], "params": 0})
            scheme = facts["scheme"]
            params = facts["params"] if name == f"{prefix}weight" else 0
            key = (_group_name(module), scheme)
            counted = name == f"{prefix}weight"
        else:
            scheme = info.dtype.lower()
            params = info.numel
            key = (_group_name(name), scheme)
            counted = True
        entry = groups.setdefault(key, [0, 0, 0])
        entry[0] += 1 if counted else 0
        entry[1] += params
        entry[2] += info.nbytes
        layer = _layer_of(name)
        if layer is not None:
            slot = layers.setdefault(layer, {"bytes": 0, "params": 0, "errors": []})
            slot["bytes"] += info.nbytes
            slot["params"] += params
    if report is not None and isinstance(report.get("tensors"), list):
        for record in report["tensors"]:
            if not isinstance(record, dict) or record.get("scheme") in (None, "copy", "passthrough", "keep", "none"):
                continue
            layer = _layer_of(str(record.get("name", "")))
            rel = record.get("relative_error")
            if layer in layers and isinstance(rel, (int, float)):
                layers[layer]["errors"].append(float(rel))
    group_list = [TensorGroup(name, scheme, c, p, b) for (name, scheme), (c, p, b) in
                  sorted(groups.items(), key=lambda kv: (-kv[1][2], kv[0]))]
    layer_list = []
    for layer in sorted(layers):
        errors = layers[layer]["errors"]
        layer_list.append({
            "layer": layer, "bytes": layers[layer]["bytes"], "params": layers[layer]["params"],
            "rel_error_mean": sum(errors) / len(errors) if errors else None,
            "rel_error_max": max(errors) if errors else None,
        })
    return group_list, layer_list


def _architecture(config: dict) -> dict:
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "torch_dtype", "dtype", "tie_word_embeddings")
    out = {"architectures": config.get("architectures") or []}
    out.update({k: config[k] for k in keys if k in config})
    return out


def _front_matter(text: str) -> dict:
    """The few `key: value` lines of a model card's YAML front matter we care about (no YAML dependency)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    out = {}
    for line in text[3:end if end > 0 else 0].splitlines():
        if ":" in line and not line.startswith((" ", "-", "\t")):
            key, _, value = line.partition(":")
            if value.strip():
                out[key.strip()] = value.strip().strip("'\"")
    return out


def _provenance(report, repo) -> dict:
    out = {}
    if report is not None:
        source = report.get("source")
        if isinstance(source, dict):
            out["source"] = source.get("repo") or source.get("path") or source.get("id")
            out["source_commit"] = source.get("commit") or source.get("revision")
        elif isinstance(source, str):
            out["source"] = source
            out["source_commit"] = report.get("source_commit") or report.get("commit")
        out["tool"] = report.get("tool", "qckpt")
        out["tool_version"] = report.get("tool_version") or report.get("version")
    readme = repo.read_small(README_FILE) if hasattr(repo, "read_small") else None
    if readme:
        meta = _front_matter(readme.decode("utf-8", errors="replace"))
        if meta.get("base_model"):
            out.setdefault("source", meta["base_model"])
            out["base_model"] = meta["base_model"]
    return {k: v for k, v in out.items() if v is not None}


def _error_summary(report) -> dict | None:
    if report is None or not isinstance(report.get("tensors"), list):
        return None
    errs = [(float(t["relative_error"]), t.get("name"), t.get("max_abs_error")) for t in report["tensors"]
            if isinstance(t, dict) and isinstance(t.get("relative_error"), (int, float))
            and t.get("scheme") not in (None, "copy", "passthrough", "keep", "none")]
    if not errs:
        return None
    worst = max(errs)
    max_abs = [e[2] for e in errs if isinstance(e[2], (int, float))]
    return {
        "quantized_tensors": len(errs), "rel_error_mean": sum(e[0] for e in errs) / len(errs),
        "rel_error_max": worst[0], "worst_tensor": worst[1], "max_abs_error": max(max_abs) if max_abs else None,
    }


def plot(insp: Inspection, path) -> str:
    """Draw per-layer relative error (from the report, when present) and size to a PNG at `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; never pop a window from a CLI
        import matplotlib.pyplot as plt
    except ImportError:
        raise CheckpointError("--plot needs matplotlib: pip install 'qckpt[plot]'") from None
    if not insp.layers:
        raise CheckpointError(f"{insp.location}: no numbered layers to plot")
    layers = [entry["layer"] for entry in insp.layers]
    has_error = any(entry["rel_error_max"] is not None for entry in insp.layers)
    fig, axes = plt.subplots(2 if has_error else 1, 1, figsize=(8, 6 if has_error else 3.5), sharex=True,
                             squeeze=False)
    size_ax = axes[-1][0]
    size_ax.bar(layers, [entry["bytes"] / 1e6 for entry in insp.layers], color="tab:blue")
    size_ax.set_ylabel("size (MB)")
    size_ax.set_xlabel("layer")
    from matplotlib.ticker import MaxNLocator

    size_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if has_error:
        err_ax = axes[0][0]
        err_ax.plot(layers, [e["rel_error_max"] for e in insp.layers], "o-", label="max", color="tab:red")
        err_ax.plot(layers, [e["rel_error_mean"] for e in insp.layers], "s--", label="mean", color="tab:orange")
        err_ax.set_ylabel("relative error")
        err_ax.legend()
    fig.suptitle(f"{insp.location}: {', '.join(insp.quant_types) or 'unquantized'}, "
                 f"{insp.bits_per_param:.2f} bits/param")
    fig.tight_layout()
    out = os.fspath(path)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)  # never leave a half-written image under the requested name
    return out
