"""`verify`: prove a quantized folder is whole and self-consistent, and optionally reproducible from its source.

Checks, each failure one `Finding` naming the file or tensor:
- config.json parses and carries a bitsandbytes `quantization_config`;
- the index (or the single `model.safetensors`) names shards that exist, and the index's weight_map and the
  shard headers agree tensor by tensor;
- every quantized module's tensors rebuild through `bnb.state_dict.from_bnb_state_dict` (keys, dtypes, shapes,
  quant-state JSON) and agree with the config (quant type, double quant, storage dtype, skip list) and with
  the codebooks (quant_map, nested_quant_map);
- qckpt_report.json, when present: every listed file has the recorded size and sha256, every listed tensor
  exists with the recorded shape;
- with `source`: every quantized tensor re-quantized from the source with the recorded settings has the same
  bytes (the first tensor that differs is named with how many bytes differ and the value error), and every
  pass-through tensor equals the source.

Files are read with safetensors' `safe_open` (never pickle); nothing is written.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .errors import CheckpointError, SourceNotFoundError, StateDictError
from .shards.digest import sha256_file

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
REPORT_FILE = "qckpt_report.json"

# The suffixes bitsandbytes writes under a quantized module (FORMAT.md 3 and 4.2).
_4BIT_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
_8BIT_SUFFIXES = ("weight", "SCB", "weight_format")
_QUANT_STATE_MARK = "weight.quant_state.bitsandbytes__"
_STATS_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: `where` is a file name or a tensor name, `message` says what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"

    def to_dict(self) -> dict:
        return {"where": self.where, "message": self.message}


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What verify looked at and what it found; `ok` when nothing was found."""

    path: str
    findings: tuple = ()
    files_checked: int = 0  # shards whose headers were read
    tensors_checked: int = 0
    quantized_modules: int = 0
    files_hashed: int = 0  # files compared against the report's sha256
    report_present: bool = False
    reproduction: dict | None = None  # with --source: tensors compared, identical, errors

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["findings"] = [f.to_dict() for f in self.findings]
        out["ok"] = self.ok
        return out


class _Findings(list):
    def add(self, where: str, message: str) -> None:
        self.append(Finding(where, " ".join(str(message).split())))


def _read_json(path: str, name: str, findings: _Findings):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        findings.add(name, "missing")
    except (UnicodeDecodeError, ValueError) as exc:
        findings.add(name, f"not valid JSON ({exc})")
    return None


def shard_names(folder: str, findings: _Findings) -> tuple[list, dict | None]:
    """The shard files the folder declares (index, else model.safetensors) and the index's weight_map."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        index = _read_json(index_path, INDEX_FILE, findings)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            findings.add(INDEX_FILE, "has no weight_map mapping tensor names to shard files")
            return [], None
        from .shards.index import check_shard_name

        for tensor, shard in weight_map.items():
            try:
                check_shard_name(shard, INDEX_FILE, tensor)
            except CheckpointError as exc:
                findings.add(INDEX_FILE, str(exc).removeprefix(INDEX_FILE + ": "))
                return [], None
        return sorted(set(weight_map.values())), weight_map
    if os.path.exists(os.path.join(folder, SINGLE_FILE)):
        return [SINGLE_FILE], None
    findings.add(folder, f"holds neither {INDEX_FILE} nor {SINGLE_FILE}")
    return [], None


def verify(path, *, source=None, revision: str | None = None, token=None, threads: int | None = None,
           check_hashes: bool = True) -> VerifyResult:
    """Check the converted folder `path`; with `source` (local path or Hub repo id) also re-quantize and compare."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise SourceNotFoundError(f"{folder}: not a folder (verify checks a local converted folder)")
    findings = _Findings()
    config = _read_json(os.path.join(folder, CONFIG_FILE), CONFIG_FILE, findings)
    qconfig = _quantization_config(config, findings)
    report = None
    if os.path.exists(os.path.join(folder, REPORT_FILE)):
        report = _read_json(os.path.join(folder, REPORT_FILE), REPORT_FILE, findings)
        if report is not None and not isinstance(report, dict):
            findings.add(REPORT_FILE, "is not a JSON object")
            report = None

    shards, weight_map = shard_names(folder, findings)
    headers = {}
    for shard in shards:
        headers[shard] = _read_header(folder, shard, findings)
    _check_unreferenced_shards(folder, shards, findings)
    location = _check_index(weight_map, headers, findings)
    if report is not None:  # transformers' own total_size may count differently; ours is exact
        _check_total_size(folder, weight_map, headers, findings)

    with _OpenShards(folder, location) as opened:
        modules = _check_quantized_modules(opened, qconfig, findings)
        files_hashed = _check_report(folder, report, location, opened, modules, findings, check_hashes)
        reproduction = None
        if source is not None:
            from .verify_source import reproduce

            reproduction = reproduce(opened, modules, qconfig, report, source, findings,
                                     revision=revision, token=token, threads=threads)
    return VerifyResult(
        path=folder, findings=tuple(findings), files_checked=sum(h is not None for h in headers.values()),
        tensors_checked=len(location), quantized_modules=len(modules), files_hashed=files_hashed,
        report_present=report is not None, reproduction=reproduction,
    )


def _quantization_config(config, findings: _Findings) -> dict:
    if config is None:
        return {}
    if not isinstance(config, dict):
        findings.add(CONFIG_FILE, "is not a JSON object")
        return {}
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict):
        findings.add(CONFIG_FILE, "has no quantization_config")
        return {}
    if qconfig.get("quant_method") != "bitsandbytes":
        findings.add(CONFIG_FILE, f"quantization_config.quant_method is {qconfig.get('quant_method')!r}, "
                                  "expected 'bitsandbytes'")
    if bool(qconfig.get("load_in_4bit")) == bool(qconfig.get("load_in_8bit")):
        findings.add(CONFIG_FILE, "quantization_config must set exactly one of load_in_4bit / load_in_8bit")
    return qconfig


def _read_header(folder: str, shard: str, findings: _Findings):
    from .shards.reader import read_header

    path = os.path.join(folder, shard)
    if not os.path.exists(path):
        findings.add(shard, "missing (named by the index)")
        return None
    try:
        return read_header(path, shard)
    except (CheckpointError, OSError) as exc:
        findings.add(shard, f"unreadable safetensors header: {exc}")
        return None


def _check_unreferenced_shards(folder: str, shards: list, findings: _Findings) -> None:
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors") and name not in shards:
            findings.add(name, "is not referenced by the index (stray or stale shard)")


def _check_index(weight_map, headers: dict, findings: _Findings) -> dict:
    """tensor name -> shard, from the headers; reports every disagreement with the index."""
    location = {}
    for shard, header in headers.items():
        if header is None:
            continue
        for info in header.tensors:
            if info.name in location:
                findings.add(info.name, f"stored twice: in {location[info.name]} and in {shard}")
                continue
            location[info.name] = shard
    if weight_map is None:
        return location
    for name, shard in weight_map.items():
        if headers.get(shard) is None:
            continue  # the missing or broken shard is already a finding
        if name not in location:
            findings.add(name, f"missing tensor: the index maps it to {shard}, which does not hold it")
        elif location[name] != shard:
            findings.add(name, f"the index maps it to {shard} but it is stored in {location[name]}")
    for name, shard in location.items():
        if name not in weight_map:
            findings.add(name, f"stored in {shard} but absent from {INDEX_FILE}")
    return location


def _check_total_size(folder: str, weight_map, headers: dict, findings: _Findings) -> None:
    if weight_map is None or any(h is None for h in headers.values()):
        return
    with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
        metadata = json.load(f).get("metadata") or {}
    declared = metadata.get("total_size") if isinstance(metadata, dict) else None
    if declared is None:
        return
    actual = sum(info.nbytes for h in headers.values() for info in h.tensors)
    if declared != actual:
        findings.add(INDEX_FILE, f"metadata.total_size is {declared} but the shards hold {actual} tensor bytes")


class _OpenShards:
    """safe_open handles of every readable shard, and tensor lookup by name."""

    def __init__(self, folder: str, location: dict):
        self.folder = folder
        self.location = location
        self._handles = {}
        self._stack = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self._stack):
            ctx.__exit__(None, None, None)
        self._stack.clear()
        self._handles.clear()

    def names(self):
        return self.location.keys()

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        shard = self.location[name]
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            ctx = safe_open(os.path.join(self.folder, shard), framework="pt", device="cpu")
            handle = ctx.__enter__()
            self._stack.append(ctx)
            self._handles[shard] = handle
        return handle


def module_tensor_names(prefix: str, kind: str, names) -> list:
    """The stored names that belong to the quantized module `prefix` (bitsandbytes' layout)."""
    if kind == "int8":
        wanted = {prefix + s for s in _8BIT_SUFFIXES}
        return [n for n in names if n in wanted]
    wanted = {prefix + s for s in _4BIT_SUFFIXES}
    return [n for n in names if n in wanted or n.startswith(prefix + _QUANT_STATE_MARK)]


def _report_tensors(report) -> dict:
    """name -> record from the report's per-tensor list (tolerant of list or mapping form)."""
    if not isinstance(report, dict):
        return {}
    tensors = report.get("tensors")
    if isinstance(tensors, dict):
        return {k: v for k, v in tensors.items() if isinstance(v, dict)}
    if isinstance(tensors, list):
        return {t["name"]: t for t in tensors if isinstance(t, dict) and isinstance(t.get("name"), str)}
    return {}


def report_files(report) -> dict:
    """file name -> {"sha256", "size"} from the report (mapping or list form)."""
    if not isinstance(report, dict):
        return {}
    files = report.get("files")
    out = {}
    if isinstance(files, dict):
        items = files.items()
    elif isinstance(files, list):
        items = ((f.get("name") or f.get("path"), f) for f in files if isinstance(f, dict))
    else:
        return {}
    for name, entry in items:
        if not isinstance(name, str):
            continue
        if isinstance(entry, str):
            out[name] = {"sha256": entry}
        elif isinstance(entry, dict):
            size = entry.get("size", entry.get("bytes"))
            out[name] = {"sha256": entry.get("sha256"), "size": size}
    return out


def _check_quantized_modules(opened: _OpenShards, qconfig: dict, findings: _Findings) -> dict:
    """prefix -> QuantizedTensor for every module that rebuilds; findings for the rest."""
    from .bnb.state_dict import from_bnb_state_dict, quantized_prefixes

    names = list(opened.names())
    prefixes = quantized_prefixes(names)
    for name in names:
        for suffix in _STATS_SUFFIXES:
            if name.endswith("." + suffix) or name == suffix:
                prefix = name[: -len(suffix)]
                if prefix not in prefixes:
                    findings.add(name, f"quantization statistics without a quant state: missing tensor "
                                       f"{prefix}{_QUANT_STATE_MARK}<type>")
    skip = qconfig.get("llm_int8_skip_modules") or []
    modules = {}
    for prefix, kind in sorted(prefixes.items()):
        module = prefix[:-1] if prefix.endswith(".") else prefix
        members = module_tensor_names(prefix, kind, names)
        try:
            sd = {n: opened.get(n) for n in members}
            qt = from_bnb_state_dict(sd, prefix)
        except StateDictError as exc:
            findings.add(f"{prefix}weight", str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a corrupt shard surfaces here as a safetensors error
            findings.add(f"{prefix}weight", f"unreadable: {exc}")
            continue
        modules[prefix] = qt
        _check_against_config(prefix, qt, sd, qconfig, findings)
        if any(_skip_matches(module, entry) for entry in skip if isinstance(entry, str)):
            findings.add(f"{prefix}weight", "is quantized but quantization_config.llm_int8_skip_modules excludes "
                                            f"module {module!r}")
    return modules


def _skip_matches(module: str, entry: str) -> bool:
    # transformers skips a module when a skip entry names it or one of its dotted ancestors/suffixes
    return module == entry or module.endswith("." + entry) or ("." + entry + ".") in ("." + module + ".")


def _check_against_config(prefix: str, qt, sd: dict, qconfig: dict, findings: _Findings) -> None:
    from .formats.codebooks import dynamic_map_signed
    from .formats.reference import lut_4bit

    where = f"{prefix}weight"
    if not qconfig:
        return
    if not qt.quant_type.is_4bit:
        if not qconfig.get("load_in_8bit"):
            findings.add(where, "is stored as int8 but quantization_config does not set load_in_8bit")
        return
    if not qconfig.get("load_in_4bit"):
        findings.add(where, f"is stored as {qt.quant_type.value} but quantization_config does not set load_in_4bit")
    want_type = qconfig.get("bnb_4bit_quant_type", "fp4")
    if qt.quant_type.value != want_type:
        findings.add(where, f"quant state says {qt.quant_type.value} but config.json says {want_type}")
    want_dq = bool(qconfig.get("bnb_4bit_use_double_quant", False))
    if qt.double_quant != want_dq:
        findings.add(where, f"double quant is {'on' if qt.double_quant else 'off'} in the quant state but "
                            f"{'on' if want_dq else 'off'} in config.json")
    storage = qconfig.get("bnb_4bit_quant_storage", "uint8")
    stored = str(sd[where].dtype).replace("torch.", "")
    if storage != stored:
        findings.add(where, f"stored as {stored} but config.json says bnb_4bit_quant_storage={storage}")
    # -0.0 == +0.0 here on purpose: bitsandbytes' Python FP4 table holds +0 where the CUDA one holds -0
    if not torch.equal(sd[f"{prefix}weight.quant_map"], lut_4bit(qt.quant_type)):
        findings.add(f"{prefix}weight.quant_map", f"is not the {qt.quant_type.value} code table")
    nested_map = sd.get(f"{prefix}weight.nested_quant_map")
    if nested_map is not None and not torch.equal(nested_map, torch.tensor(dynamic_map_signed(), dtype=torch.float32)):
        findings.add(f"{prefix}weight.nested_quant_map", "is not the signed 8-bit dynamic map")


def _check_report(folder: str, report, location: dict, opened: _OpenShards, modules: dict, findings: _Findings,
                  check_hashes: bool) -> int:
    if report is None:
        return 0
    hashed = 0
    from .shards.index import check_shard_name

    for name, entry in sorted(report_files(report).items()):
        path = os.path.join(folder, name)
        if os.path.basename(name) == REPORT_FILE:
            continue
        try:
            check_shard_name(name, REPORT_FILE)
        except CheckpointError:
            findings.add(REPORT_FILE, f"lists a file outside the folder: {name!r}")
            continue
        if not os.path.isfile(path):
            findings.add(name, f"missing (listed in {REPORT_FILE})")
            continue
        size = os.path.getsize(path)
        if isinstance(entry.get("size"), int) and entry["size"] != size:
            findings.add(name, f"size {size} bytes, {REPORT_FILE} records {entry['size']}")
            continue
        if check_hashes and isinstance(entry.get("sha256"), str):
            actual = sha256_file(path)
            hashed += 1
            if actual != entry["sha256"]:
                findings.add(name, f"sha256 {actual} does not match {entry['sha256']} recorded in {REPORT_FILE}")
    for name, record in sorted(_report_tensors(report).items()):
        stored = _stored_names_for_record(name, record, location)
        if not stored:
            findings.add(name, f"missing tensor (listed in {REPORT_FILE})")
            continue
        _check_record(name, record, modules, location, opened, findings)
    return hashed


def _check_record(name: str, record: dict, modules: dict, location: dict, opened, findings: _Findings) -> None:
    """A tensor's report entry (scheme, shape) against what is stored."""
    scheme, shape = record.get("scheme"), record.get("shape")
    prefix = name[: -len("weight")] if name.endswith("weight") else None
    qt = modules.get(prefix) if prefix is not None else None
    if scheme in ("nf4", "fp4", "int8"):
        if qt is None:
            if prefix is not None and name in location and not any(
                    n.startswith(prefix + _QUANT_STATE_MARK) or n == prefix + "SCB" for n in location):
                findings.add(name, f"{REPORT_FILE} says {scheme} but it is stored unquantized")
            return  # a broken quantized module is already a finding
        if qt.quant_type.value != scheme:
            findings.add(name, f"stored as {qt.quant_type.value} but {REPORT_FILE} says {scheme}")
        if isinstance(shape, list) and tuple(shape) != tuple(qt.shape):
            findings.add(name, f"quant state shape {list(qt.shape)} but {REPORT_FILE} records {shape}")
    elif name in location and isinstance(shape, list):
        try:
            stored = list(opened.shape(name))
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a broken file
            findings.add(name, f"unreadable: {exc}")
            return
        if stored != shape:
            findings.add(name, f"shape {stored}, {REPORT_FILE} records {shape}")


def _stored_names_for_record(name: str, record: dict, location: dict) -> list:
    """A report names the source tensor (`x.weight`); a quantized one is stored as `x.weight` + stats."""
    if name in location:
        return [name]
    return [n for n in location if n.startswith(name + ".")]

