"""Data only: the code tables and decision thresholds of FORMAT.md sections 1.1, 1.3 and 2.2.

Values are given as float32 bit patterns so that no decimal round trip can move them by an ulp.
"""
import enum
import struct


class QuantType(str, enum.Enum):
    """The schemes qckpt writes; the value is the name used in files and on the command line."""

    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"

    @property
    def is_4bit(self) -> bool:
        return self in (QuantType.NF4, QuantType.FP4)

    @classmethod
    def parse(cls, value) -> "QuantType":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(q.value for q in cls)
            raise ValueError(f"unknown quant type {value!r} (expected one of: {names})") from None


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def f32_round(x: float) -> float:
    """Round a Python float to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# NF4 table in code order (FORMAT.md 1.1); sorted, so code order is value order.
NF4_BITS = (
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
)
NF4_VALUES = tuple(_f32(b) for b in NF4_BITS)
# CUDA compares x_n > t against the exact float32 midpoints; code = number of thresholds below x_n.
NF4_THRESHOLDS = tuple(f32_round((NF4_VALUES[i] + NF4_VALUES[i + 1]) / 2) for i in range(15))

# FP4 magnitude by 3-bit magnitude code; bit 3 is the sign. Code 8 is -0.0 as in the CUDA LUT.
_FP4_MAGNITUDE_BITS = (0x00000000, 0x3BAAAAAB, 0x3F2AAAAB, 0x3F800000, 0x3EAAAAAB, 0x3F000000, 0x3E2AAAAB, 0x3E800000)
FP4_MAGNITUDES = tuple(_f32(b) for b in _FP4_MAGNITUDE_BITS)
FP4_VALUES = FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES)
# The literal thresholds of the CUDA kernel (a few ulps off the midpoints, FORMAT.md 1.3).
FP4_THRESHOLD_BITS = (0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555)
FP4_THRESHOLDS = tuple(_f32(b) for b in FP4_THRESHOLD_BITS)
# Magnitude bucket (number of thresholds strictly below |x_n|) -> 3-bit magnitude code.
FP4_BUCKET_TO_CODE = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)

# The quantized value of 0.0, used to pad an odd element count (FORMAT.md 1.2).
PAD_CODE = {QuantType.NF4: 7, QuantType.FP4: 0}

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# 1/127 as bitsandbytes' CPU/default int8 dequantization writes it (FORMAT.md 4.1 step 5).
INT8_DEQUANT_SCALE = 7.874015718698502e-3


def dynamic_map_signed() -> tuple:
    """The 256-entry signed dynamic map of FORMAT.md 2.2, built exactly as bitsandbytes builds it."""
    import torch

    values = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2
        scaled = means * (10 ** (i - 6))
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return tuple(sorted(f32_round(v) for v in values))
