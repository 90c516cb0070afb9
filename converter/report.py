"""The conversion report (qckpt_report.json): per-tensor sizes and errors, totals, settings, provenance,
and the Hub model card text built from it."""
from __future__ import annotations

import dataclasses
import json
import math


@dataclasses.dataclass(frozen=True)
class TensorStat:
    """One source tensor: how it was stored and what it cost."""

    name: str
    shape: tuple
    source_dtype: str  # safetensors name: BF16, F32, ...
    scheme: str  # nf4 | fp4 | int8 | copy
    bytes_before: int
    bytes_after: int
    relative_error: float | None = None  # ||deq - w|| / ||w|| (None for copies)
    max_abs_error: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorStat":
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclasses.dataclass(frozen=True)
class Report:
    """What convert() did. `timings` is the only part that differs between identical runs."""

    tool_version: str
    source: str
    commit: str | None
    output: str
    settings: dict
    tensors: tuple  # TensorStat
    files: dict  # output file name -> sha256
    quantization_config: dict | None
    model_class: str | None
    timings: dict = dataclasses.field(default_factory=dict)
    push: dict | None = None  # publish.PushResult.to_dict() with --push-to (not in the saved report: it
    # is committed by that push, so it cannot name the commit)

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tensors)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tensors)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def quantized(self) -> list:
        return [t for t in self.tensors if t.scheme != "copy"]

    def totals(self) -> dict:
        q = self.quantized
        params = self.parameters
        q_params = sum(t.numel for t in q)
        q_after = sum(t.bytes_after for t in q)
        errors = [t.relative_error for t in q if t.relative_error is not None]
        weighted = (math.sqrt(sum((t.relative_error ** 2) * t.numel for t in q) / q_params) if q_params else None)
        return {
            "tensors": len(self.tensors),
            "quantized_tensors": len(q),
            "parameters": params,
            "quantized_parameters": q_params,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "compression": round(self.bytes_before / self.bytes_after, 4) if self.bytes_after else None,
            "bits_per_parameter": round(8 * self.bytes_after / params, 4) if params else None,
            "bits_per_quantized_parameter": round(8 * q_after / q_params, 4) if q_params else None,
            "relative_error_mean": (sum(errors) / len(errors)) if errors else None,
            "relative_error_max": max(errors) if errors else None,
            "relative_error_rms_weighted": weighted,
            "max_abs_error": max((t.max_abs_error for t in q if t.max_abs_error is not None), default=None),
        }

    def summary(self) -> dict:
        """The short JSON `--json` prints."""
        return {
            "output": self.output, "source": self.source, "commit": self.commit,
            "quant": self.settings.get("quant"), **self.totals(),
            "seconds": self.timings.get("total_s"),
            **({"pushed_to": self.push["repo_id"], "push_commit": self.push["commit"]} if self.push else {}),
        }

    def summary_text(self) -> str:
        t = self.totals()
        lines = [
            f"converted {self.source} -> {self.output}",
            f"  {t['quantized_tensors']}/{t['tensors']} tensors quantized ({self.settings.get('quant')}, "
            f"blocksize {self.settings.get('blocksize')}, double quant {self.settings.get('double_quant')})",
            f"  {_human(t['bytes_before'])} -> {_human(t['bytes_after'])} "
            f"({t['compression']}x, {t['bits_per_parameter']} bits/parameter)",
        ]
        if t["relative_error_mean"] is not None:
            lines.append(f"  relative error: mean {t['relative_error_mean']:.4f}, max {t['relative_error_max']:.4f}")
        if self.timings.get("total_s") is not None:
            lines.append(f"  took {self.timings['total_s']:.2f} s")
        if self.push:
            lines.append(f"  pushed {len(self.push['files'])} files to {self.push['repo_id']}@{self.push['revision']}"
                         f"{' commit ' + self.push['commit'] if self.push.get('commit') else ''}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = {
            "tool": "qckpt", "tool_version": self.tool_version, "source": self.source, "commit": self.commit,
            "output": self.output, "model_class": self.model_class, "settings": dict(self.settings),
            "quantization_config": self.quantization_config, "totals": self.totals(),
            "timings": dict(self.timings), "files": dict(sorted(self.files.items())),
            "tensors": [t.to_dict() for t in self.tensors],
        }
        if self.push is not None:
            d["push"] = dict(self.push)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        return cls(
            tool_version=d["tool_version"], source=d["source"], commit=d.get("commit"), output=d["output"],
            settings=dict(d["settings"]), tensors=tuple(TensorStat.from_dict(t) for t in d["tensors"]),
            files=dict(d.get("files", {})), quantization_config=d.get("quantization_config"),
            model_class=d.get("model_class"), timings=dict(d.get("timings", {})), push=d.get("push"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def model_card(report: Report, name: str, base_model: str | None) -> str:
    """README.md for the Hub: YAML front matter, settings table, size and error summary, how to load.

    `base_model` is a Hub repo id or None: the Hub rejects a card whose base_model is not an existing
    model, so a local source with no known repo id gets no base_model lines."""
    s = report.settings
    t = report.totals()
    four = s.get("quant") in ("nf4", "fp4")
    tags = ["bitsandbytes", "4-bit" if four else "8-bit", s.get("quant"), "qckpt", "quantized"]
    front = ["---"]
    if base_model:
        front += [f"base_model: {base_model}", "base_model_relation: quantized"]
    front += ["library_name: transformers", "tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    base_model = base_model or name
    scheme = {"nf4": "NF4", "fp4": "FP4", "int8": "LLM.int8 (row-wise INT8)"}[s.get("quant")]
    dq = f", double quant {'on' if s.get('double_quant') else 'off'}" if four else ""
    name = base_model.rstrip("/").split("/")[-1] or base_model
    rows = [
        ("quantization", scheme), ("blocksize", s.get("blocksize") if four else "per row"),
        ("double quant", s.get("double_quant") if four else "n/a"),
        ("compute dtype", s.get("compute_dtype") if four else "n/a"),
        ("skipped (--skip)", ", ".join(s.get("skip") or []) or "none"),
        ("source", f"`{report.source}`" + (f" @ `{report.commit}`" if report.commit else "")),
        ("tool", f"qckpt {report.tool_version}"),
    ]
    body = [
        f"# {name} ({scheme}, bitsandbytes format)", "",
        f"A bitsandbytes {scheme} quantization of `{base_model}`{dq}, written by qckpt without loading the "
        "model. The tensors follow the bitsandbytes checkpoint layout exactly, so `transformers` loads it "
        "as a pre-quantized model.", "",
        "| setting | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
        "## Size and error", "",
        f"- {t['quantized_tensors']} of {t['tensors']} tensors quantized; the rest (embeddings, norms, biases, "
        "output head) are stored unchanged.",
        f"- {_human(t['bytes_before'])} -> {_human(t['bytes_after'])} ({t['compression']}x); "
        f"{t['bits_per_parameter']} bits per parameter overall, {t['bits_per_quantized_parameter']} per quantized parameter.",
    ]
    if t["relative_error_mean"] is not None:
        body.append(f"- Relative weight error (||W_q - W|| / ||W||): mean {t['relative_error_mean']:.4f}, "
                    f"max {t['relative_error_max']:.4f}; largest absolute error {t['max_abs_error']:.4g}. "
                    "Per-tensor figures are in `qckpt_report.json`.")
    auto = "AutoModelForCausalLM" if (report.model_class or "").endswith("ForCausalLM") else "AutoModel"
    body += [
        "", "## How to load", "", "With transformers (needs `bitsandbytes` and `accelerate`):", "", "```python",
        f"from transformers import {auto}", f'model = {auto}.from_pretrained("REPO_OR_PATH")', "```", "",
        "With qckpt (no bitsandbytes needed):", "", "```python", "import converter",
        'model = converter.load_quantized("REPO_OR_PATH")', "```", "",
    ]
    return "\n".join(front + body)

