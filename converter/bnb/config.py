"""The `quantization_config` block transformers writes for bitsandbytes (FORMAT.md 5.1), all 13 keys."""
from __future__ import annotations

from ..formats.codebooks import QuantType


def quantization_config(
    quant_type,
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules: list | None = None,
    threshold: float = 6.0,
) -> dict:
    """Keys sorted as transformers sorts them. `skip_modules=None` lets transformers derive its defaults;
    a list replaces them (then it must name every unquantized linear module, lm_head included)."""
    quant_type = QuantType.parse(quant_type)
    four = quant_type.is_4bit
    config = {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": compute_dtype if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type.value if four else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None if skip_modules is None else list(skip_modules),
        "llm_int8_threshold": float(threshold),
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }
    return dict(sorted(config.items()))
