"""convert(): plan from headers, stream shard by shard (next shard prefetched), quantize, write, report.

Everything is written under OUTPUT/.qckpt-partial/ and moved into OUTPUT only when the whole conversion
is done (config.json last), so an interrupted run leaves nothing that looks like a finished checkpoint.
Finished output shards are recorded in .qckpt-partial/progress.json; --resume re-hashes them and skips
their tensors (and the source shards only they need).

With a config.json, transformers' plan is built in a thread (plan.PendingPlan) while the first output shard
is produced on a name-based guess; that shard is committed only if the real plan is identical, else the
work is redone on the real plan. With push_to, each committed shard is uploaded and deleted at once
(publish.HubShardStream) and one commit is made from staging at the end, before OUTPUT is filled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time

import torch

from . import _version
from .errors import CheckpointError, OutputExistsError, QuantizationInputError
from .formats import codebooks as cb
from .error_stats import error_stats
from .formats.codebooks import QuantType
from .overlap import OrderedWorker, ReadAhead
from .plan import PendingPlan, TensorPlan, assign_shards, plan_with_config, plan_without_config
from .report import Report, TensorStat, model_card
from .shards.digest import sha256_file
from .shards.index import INDEX_NAME, index_json, shard_name
from .shards.reader import SafetensorsFile
from .shards.header import Entry
from .shards.writer import ShardWriter

STAGING = ".qckpt-partial"
PROGRESS = "progress.json"
REPORT_NAME = "qckpt_report.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def parse_size(value) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB', or an int of bytes (transformers' convention: GB = 10**9)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise QuantizationInputError(f"invalid size {value!r} (expected e.g. 5GB, 500MB, 2GiB)")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if size <= 0:
        raise QuantizationInputError(f"invalid size {value!r}: must be positive")
    return size


@dataclasses.dataclass(frozen=True)
class Settings:
    quant: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    skip: tuple = ()
    max_shard_size: int = 5 * 10**9

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        if self.quant == "int8":
            d["blocksize"] = None
            d["double_quant"] = False
        return d


def _check_settings(quant, blocksize, double_quant, compute_dtype, skip, max_shard_size) -> Settings:
    try:
        qtype = QuantType.parse(quant)
    except ValueError as exc:
        raise QuantizationInputError(str(exc)) from None
    if qtype.is_4bit and blocksize not in cb.BLOCKSIZES_4BIT:
        raise QuantizationInputError(f"unsupported blocksize {blocksize!r} (expected one of {list(cb.BLOCKSIZES_4BIT)})")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise QuantizationInputError(f"unsupported compute dtype {compute_dtype!r} (expected one of {list(_COMPUTE_DTYPES)})")
    skip = (skip,) if isinstance(skip, str) else tuple(skip or ())
    return Settings(qtype.value, int(blocksize), bool(double_quant), compute_dtype, skip, parse_size(max_shard_size))


def _prepare_output(output: str, source_path: str | None, *, overwrite: bool, resume: bool) -> str:
    output = os.path.abspath(output)
    if source_path is not None:
        src = os.path.abspath(source_path)
        src_dir = src if os.path.isdir(src) else os.path.dirname(src)
        if output == src_dir or src.startswith(output + os.sep):
            raise OutputExistsError(f"{output}: output would overwrite the source checkpoint")
    if os.path.isfile(output):
        raise OutputExistsError(f"{output}: exists and is a file")
    if os.path.isdir(output) and os.listdir(output):
        if resume:
            pass
        elif overwrite:
            # old files stay until the new conversion is complete (_publish replaces them)
            shutil.rmtree(os.path.join(output, STAGING), ignore_errors=True)
        else:
            raise OutputExistsError(f"{output}: folder exists and is not empty (use --overwrite or --resume)")
    os.makedirs(os.path.join(output, STAGING), exist_ok=True)
    return output


def _resolve_device(device) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise QuantizationInputError(f"unsupported device {device!r} (expected auto, cpu or cuda)")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise QuantizationInputError(f"device {device!r} requested but no CUDA device is available")
    return str(device)


def _write_text(path: str, text: str) -> str:
    data = text.encode("utf-8")
    # hidden temporary name: one a crash leaves behind is dropped by _publish, never moved into OUTPUT
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _add_all(writer: ShardWriter, outputs: list) -> None:
    for key, value in outputs:
        writer.add(key, value)


class _Run:
    """Per-conversion state, passed explicitly (no globals)."""

    def __init__(self, output, settings, device, threads, progress):
        self.output = output
        self.staging = os.path.join(output, STAGING)
        self.settings = settings
        self.device = device
        self.threads = threads
        self.progress = progress
        self.stream = None  # a publish.HubShardStream with --push-to
        self.pending = None  # a plan.PendingPlan while work runs on its guess
        self.plan = None  # the real plan, once a guess was confirmed
        self.timings = {"read_s": 0.0, "quantize_s": 0.0, "error_s": 0.0, "write_s": 0.0}
        self._scratch = {}  # slot -> float32 buffer, grown to the largest quantized tensor

    def scratch(self, slot: int, numel: int, device) -> torch.Tensor:
        buf = self._scratch.get(slot)
        if buf is None or buf.numel() < numel or buf.device != torch.device(device):
            buf = self._scratch[slot] = None
            buf = self._scratch[slot] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf[:numel]

    def process_tensor(self, reader: SafetensorsFile, tp: TensorPlan, writer: ShardWriter, *, reads=None,
                       writes=None) -> TensorStat:
        """Quantize (or copy) one tensor into `writer`. reads: an overlap.ReadAhead over `reader`; writes: an
        overlap.OrderedWorker that appends to the shard in the background (drained before a copy)."""
        s = self.settings
        t0 = time.perf_counter()
        if not tp.quantize:  # streamed in chunks: an embedding never sits in memory whole
            if writes is not None:
                writes.drain()  # the shard's pieces stay in order
            writer.add_stream(Entry(tp.name, tp.info.dtype, tp.info.shape), lambda write: reader.copy_raw(tp.name, write))
            self.timings["write_s"] += time.perf_counter() - t0
            return TensorStat(tp.name, tp.info.shape, tp.info.dtype, "copy", tp.info.nbytes, tp.info.nbytes)
        from .tensor import quantize

        tensor = reads.read(tp.name) if reads is not None else reader.read(tp.name)
        t1 = time.perf_counter()
        self.timings["read_s"] += t1 - t0

        weight = tensor.t().contiguous() if tp.transpose else tensor
        del tensor
        if self.device != "cpu":  # one pinned H2D copy serves the quantize kernels and the error pass
            from .kernels import cuda as kcuda

            weight = kcuda.to_device(weight, self.device)
        qt = quantize(weight, s.quant, blocksize=s.blocksize, double_quant=s.double_quant,
                      device=None if self.device == "cpu" else self.device, threads=self.threads,
                      name=f"{reader.where}: tensor {tp.name}")
        t2 = time.perf_counter()
        self.timings["quantize_s"] += t2 - t1
        rel, max_abs = error_stats(qt, weight, self.scratch)
        t3 = time.perf_counter()
        self.timings["error_s"] += t3 - t2
        after = 0
        outputs = []
        for key, value in qt.state_dict(tp.module + ".").items():
            outputs.append((key, value.cpu()))  # device copies here: the writer thread only does file I/O
            after += value.numel() * value.element_size()
        if writes is None:
            for key, value in outputs:
                writer.add(key, value)
        else:
            writes.submit(_add_all, writer, outputs)
        self.timings["write_s"] += time.perf_counter() - t3
        return TensorStat(tp.name, tp.info.shape, tp.info.dtype, s.quant, tp.info.nbytes, after, rel, max_abs)


def _collect_infos(source) -> list:
    """[(shard, TensorInfo)] in processing order; the index (if any) must agree with the headers."""
    infos, seen = [], {}
    weight_map = getattr(source, "weight_map", None)
    for shard in source.shards:
        header = source.header(shard)
        names = {t.name for t in header.tensors}
        for info in header.tensors:
            if weight_map is not None and weight_map.get(info.name) != shard:
                continue  # not loaded by transformers either: the index is the authority
            if info.name in seen:
                raise CheckpointError(f"{shard}: tensor {info.name!r} also appears in {seen[info.name]}")
            seen[info.name] = shard
            infos.append((shard, info))
        if weight_map is not None:
            for tensor, owner in weight_map.items():
                if owner == shard and tensor not in names:
                    raise CheckpointError(f"{INDEX_NAME}: tensor {tensor!r} is listed in {shard}, which does not contain it")
    if not infos:
        raise CheckpointError(f"{source.description}: the checkpoint holds no tensors")
    return infos


def _source_dtype(infos) -> str:
    """The float dtype holding most parameter bytes: what the config's `dtype` records."""
    by = {}
    for _, info in infos:
        if info.dtype in ("F32", "F16", "BF16"):
            by[info.dtype] = by.get(info.dtype, 0) + info.nbytes
    best = max(by, key=by.get) if by else "F32"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[best]


def _fingerprint(source, infos, settings, assignment) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([source.description, source.commit, settings.to_dict(), _version.__version__]).encode())
    for (shard, info), out in zip(infos, assignment):
        h.update(f"{shard}|{info.name}|{info.dtype}|{info.shape}|{info.start}|{out}\n".encode())
    if source.commit is None:  # a local source has no commit: a rewritten shard must not be resumed over
        for shard in source.shards:
            st = os.stat(source.shard_path(shard))
            h.update(f"{shard}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_progress(staging: str, fingerprint: str, n_out: int) -> dict:
    """{output shard index: {sha256, file, stats}} of shards a previous run finished and that still hash right."""
    path = os.path.join(staging, PROGRESS)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    if state.get("fingerprint") != fingerprint:
        return {}
    done = {}
    for key, entry in state.get("shards", {}).items():
        i = int(key)
        if i >= n_out or entry.get("file") != shard_name(i, n_out) or "tensors" not in entry:
            continue
        full = os.path.join(staging, entry["file"])
        if os.path.isfile(full) and sha256_file(full) == entry["sha256"]:
            done[i] = entry
    return done


def _drop_stale_shards(staging: str, done: dict) -> None:
    """Shards in staging that this run will not reuse (another plan, or not re-checked) must not be published."""
    keep = {entry["file"] for entry in done.values()}
    for entry in os.listdir(staging):
        if entry.endswith(".safetensors") and entry not in keep:
            os.unlink(os.path.join(staging, entry))


def _save_progress(staging: str, fingerprint: str, done: dict) -> None:
    _write_text(os.path.join(staging, PROGRESS),
                json.dumps({"fingerprint": fingerprint, "shards": {str(k): v for k, v in sorted(done.items())}}))


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def convert(
    source,
    output,
    *,
    quant: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip=(),
    revision: str | None = None,
    token: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    max_shard_size="5GB",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    retries: int | None = None,
    push_to: str | None = None,
    private: bool = False,
) -> Report:
    """Quantize the checkpoint at `source` (folder, .safetensors file or Hub repo id) into `output`.

    With `push_to` (a Hub repo id), each output shard is uploaded as soon as it is written and then deleted
    locally, and one commit at the end adds the shards plus config, index, card and report; `output` keeps
    only those small files. Nothing is committed unless the whole conversion succeeds. `--resume` cannot
    reuse shards that were already pushed (they are gone locally): they are quantized again, and their
    upload is skipped by the Hub, which already stores the identical bytes.
    """
    from .settings import resolve_threads
    from .sources import open_source

    start = time.perf_counter()
    settings = _check_settings(quant, blocksize, double_quant, compute_dtype, skip, max_shard_size)
    device = _resolve_device(device)
    threads = resolve_threads(threads)
    if progress is None:
        progress = sys.stderr.isatty()
    local_path = os.fspath(source) if os.path.exists(os.fspath(source)) else None
    output = _prepare_output(os.fspath(output), local_path, overwrite=overwrite, resume=resume)
    run = _Run(output, settings, device, threads, progress)
    src = open_source(source, revision=revision, token=token, work_dir=os.path.join(run.staging, "download"),
                      retries=retries)
    if hasattr(src, "progress"):
        src.progress = progress
    try:
        t0 = time.perf_counter()
        infos = _collect_infos(src)
        if src.config_dir is None:
            plan = plan_without_config(infos, settings.skip)
        elif resume or push_to is not None:
            # no guessing: resume needs the real plan's fingerprint, and a push must not create a repo
            # for a source whose config then turns out unusable
            plan = plan_with_config(infos, src.config_dir, settings.skip)
        else:
            run.pending = PendingPlan(infos, src.config_dir, settings.skip)
            plan = run.pending.guess
        assignment = assign_shards(plan, settings.quant, settings.blocksize, settings.double_quant,
                                   settings.max_shard_size)
        n_out = assignment[-1] + 1
        run.timings["plan_s"] = time.perf_counter() - t0
        fingerprint = _fingerprint(src, infos, settings, assignment)
        done = _load_progress(run.staging, fingerprint, n_out) if resume else {}
        _drop_stale_shards(run.staging, done)
        if push_to is not None:
            # made after planning, so a bad source creates no repo; before any work, so a bad token or
            # repo name fails early
            from .publish import stream_shards_to_hub

            run.stream = stream_shards_to_hub(push_to, private=private, token=token)
            run.stream.progress = progress
            for out in sorted(done):  # finished by an interrupted run but maybe never uploaded
                run.stream.add_shard(os.path.join(run.staging, done[out]["file"]), done[out]["file"])
        try:
            stats = _convert_shards(run, src, plan, assignment, n_out, done, fingerprint)
        except _GuessWasWrong:
            plan, run.pending = run.pending.result(), None
            assignment = assign_shards(plan, settings.quant, settings.blocksize, settings.double_quant,
                                       settings.max_shard_size)
            n_out = assignment[-1] + 1
            fingerprint = _fingerprint(src, infos, settings, assignment)
            done = {}
            _drop_stale_shards(run.staging, done)
            stats = _convert_shards(run, src, plan, assignment, n_out, done, fingerprint)
        plan = run.plan or plan
        report = _finish(run, src, plan, settings, stats, done, n_out, infos, start)
    except BaseException:
        src.close()
        raise
    src.close()
    return report


def _convert_shards(run, src, plan, assignment, n_out, done, fingerprint) -> dict:
    """Write every unfinished output shard; return {plan index: TensorStat} for the tensors written now."""
    last_of = {}
    for i, out in enumerate(assignment):
        last_of[out] = i
    todo = [i for i, out in enumerate(assignment) if out not in done]
    needed = []
    for i in todo:
        shard = plan.tensors[i].shard
        if shard not in needed:
            needed.append(shard)
    by_shard = {}
    for i in todo:
        by_shard.setdefault(plan.tensors[i].shard, []).append(i)
    stats = {}
    writer = None
    writer_index = None
    writes = OrderedWorker("qckpt-write")  # appends to the open shard in the background
    bar = _progress_bar(sum(plan.tensors[i].info.nbytes for i in todo), run.progress, "quantize")
    try:
        for shard, path in src.iter_shards(needed):
            with SafetensorsFile(path, display_name=getattr(src, "display_name", lambda s: s)(shard)) as reader:
                _check_same_header(reader, plan, by_shard[shard])
                reads = ReadAhead(reader, [plan.tensors[i].name for i in by_shard[shard] if plan.tensors[i].quantize])
                try:
                    for i in by_shard[shard]:
                        tp = plan.tensors[i]
                        out = assignment[i]
                        if writer is None or writer_index != out:
                            writer = ShardWriter(os.path.join(run.staging, shard_name(out, n_out)))
                            writer_index = out
                        stats[i] = run.process_tensor(reader, tp, writer, reads=reads, writes=writes)
                        bar.update(tp.info.nbytes)
                        if i == last_of[out]:
                            writes.drain()
                            _commit_shard(run, writer, out, n_out, assignment, stats, done, fingerprint)
                            writer = None  # the next shard's writer opens with its first tensor
                finally:
                    reads.close()
    except BaseException:
        writes.close()
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    writes.close()
    return stats


def _commit_shard(run, writer, out, n_out, assignment, stats, done, fingerprint) -> None:
    """Make output shard `out` appear (after confirming a guessed plan: nothing is committed on a guess),
    record it for the index and --resume, and push it with --push-to."""
    if run.pending is not None:
        _confirm_plan(run)
    t0 = time.perf_counter()
    sha = writer.commit()
    run.timings["write_s"] += time.perf_counter() - t0
    # the index is built from these, not by reopening the file (gone after a push)
    done[out] = {"file": shard_name(out, n_out), "sha256": sha,
                 "tensors": {e.name: e.nbytes for e in writer.entries()},
                 "stats": [stats[j].to_dict() for j in range(len(assignment)) if assignment[j] == out]}
    _save_progress(run.staging, fingerprint, done)
    if run.stream is not None:
        t0 = time.perf_counter()
        run.stream.add_shard(os.path.join(run.staging, done[out]["file"]), done[out]["file"])
        run.timings["push_s"] = run.timings.get("push_s", 0.0) + time.perf_counter() - t0


class _GuessWasWrong(Exception):
    """The real plan differs from the guessed one the first shard was started on: start over with it."""


def _confirm_plan(run) -> None:
    """Wait for the real plan; keep the work done on the guess only if they are identical."""
    t0 = time.perf_counter()
    real = run.pending.result()
    run.timings["plan_s"] += time.perf_counter() - t0  # the wait: what planning cost this run's wall time
    run.timings["plan_thread_s"] = run.pending.seconds
    if not run.pending.confirmed():
        raise _GuessWasWrong()
    run.plan, run.pending = real, None


def _check_same_header(reader, plan, indices) -> None:
    """A downloaded shard must hold what its header promised when the plan was made."""
    for i in indices:
        tp = plan.tensors[i]
        try:
            got = reader.info(tp.name)
        except KeyError:
            raise CheckpointError(f"{reader.where}: tensor {tp.name!r} is missing from the downloaded shard") from None
        if (got.dtype, got.shape, got.nbytes) != (tp.info.dtype, tp.info.shape, tp.info.nbytes):
            raise CheckpointError(f"{reader.where}: tensor {tp.name!r} changed between planning and reading")


def _finish(run, src, plan, settings, stats, done, n_out, infos, start) -> Report:
    from .bnb.config import quantization_config

    staging = run.staging
    all_stats = []
    for out in range(n_out):
        all_stats += [TensorStat.from_dict(d) for d in done[out]["stats"]]
    files = {done[out]["file"]: done[out]["sha256"] for out in range(n_out)}
    if n_out > 1:
        weight_map, total = {}, 0
        for out in range(n_out):
            for tensor, nbytes in done[out]["tensors"].items():
                weight_map[tensor] = done[out]["file"]
                total += nbytes
        files[INDEX_NAME] = _write_text(os.path.join(staging, INDEX_NAME), index_json(weight_map, total))
    qconfig = None
    if src.config_dir is not None:
        qconfig = quantization_config(settings.quant, settings.double_quant, settings.compute_dtype, plan.skip_modules)
        with open(os.path.join(src.config_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config.pop("torch_dtype", None)
        config["dtype"] = _source_dtype(infos)
        config["quantization_config"] = qconfig
        files["config.json"] = _write_text(os.path.join(staging, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
    for rel, full in src.extra_files(exclude=run.output):
        dest = os.path.join(staging, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(full, dest)
        files[rel] = sha256_file(dest)
    run.timings["total_s"] = time.perf_counter() - start
    name = getattr(src, "repo_id", None) or os.path.basename(src.path.rstrip(os.sep))
    # a local folder's true Hub id is unknown (config `_name_or_path` often names the model it was
    # fine-tuned from, not this one), and the Hub rejects a base_model that is not a model: leave it out
    base = getattr(src, "repo_id", None)
    report = Report(
        tool_version=_version.__version__, source=src.description, commit=src.commit, output=run.output,
        settings={**settings.to_dict(), "device": run.device, "threads": run.threads}, tensors=tuple(all_stats),
        files={}, quantization_config=qconfig, model_class=plan.model_class,
        timings={k: round(v, 4) for k, v in run.timings.items()},
    )
    files["README.md"] = _write_text(os.path.join(staging, "README.md"),
                                     model_card(report, name, base))
    report = dataclasses.replace(report, files=files)
    _write_text(os.path.join(staging, REPORT_NAME), report.to_json())
    if run.stream is not None:
        # committed from staging, before anything moves into OUTPUT: a failed commit leaves no
        # complete-looking folder, and the repo gets nothing
        small = [(os.path.join(staging, rel), rel) for rel in [*files, REPORT_NAME] if rel not in run.stream.uploaded]
        pushed = run.stream.finish(None, extra_files=small)
        report = dataclasses.replace(report, push=pushed.to_dict())
    _publish(staging, run.output)
    return report


def _publish(staging: str, output: str) -> None:
    """Move finished files from staging into place; config.json last (it is what makes a folder loadable)."""
    download = os.path.join(staging, "download")
    if os.path.isdir(download):
        shutil.rmtree(download)
    progress = os.path.join(staging, PROGRESS)
    if os.path.exists(progress):
        os.unlink(progress)
    for entry in os.listdir(output):  # --overwrite: what was there before goes only now
        full = os.path.join(output, entry)
        if entry == STAGING:
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)
    entries = sorted(os.listdir(staging), key=lambda e: (e == "config.json", e))
    for entry in entries:
        if entry.startswith(".") and entry.endswith(".tmp"):
            os.unlink(os.path.join(staging, entry))
            continue
        dest = os.path.join(output, entry)
        if os.path.isdir(dest) and not os.path.islink(dest):
            shutil.rmtree(dest)
        os.replace(os.path.join(staging, entry), dest)
    os.rmdir(staging)
