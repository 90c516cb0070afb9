"""Pure-torch reference arithmetic for every scheme: slow, obvious, and the definition of the bytes.

The native kernels (CPU and CUDA) must reproduce these functions bit for bit; tests compare them on
random inputs. All arithmetic is IEEE float32 (FORMAT.md section 0): the reciprocal is `1.0f / absmax`
rounded once, then one float32 multiply; code selection compares strictly against float32 thresholds.
"""
from fractions import Fraction

import torch

from . import codebooks as cb
from .codebooks import QuantType


def _flat_f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).to(torch.float32)


def _blocks(flat: torch.Tensor, blocksize: int, fill: float = 0.0) -> torch.Tensor:
    """Pad to whole blocks with `fill`; padded elements never influence absmax or codes kept."""
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.full((nb * blocksize,), fill, dtype=torch.float32)
    padded[:n] = flat
    return padded.view(nb, blocksize)


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    return _blocks(flat.abs(), blocksize).amax(dim=1)


def _normalize(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    # 1.0f / absmax in float32 (absmax 0 gives inf, and 0 * inf = NaN, which selects code 0 below).
    recip = torch.reciprocal(absmax)
    n = flat.numel()
    return (_blocks(flat, blocksize) * recip[:, None]).reshape(-1)[:n]


def codes_nf4(xn: torch.Tensor) -> torch.Tensor:
    """Number of NF4 thresholds strictly below x_n (ties to the lower code; NaN -> 0)."""
    thresholds = torch.tensor(cb.NF4_THRESHOLDS, dtype=torch.float32)
    return (xn[:, None] > thresholds[None, :]).sum(dim=1).to(torch.uint8)


def codes_fp4(xn: torch.Tensor) -> torch.Tensor:
    """Sign from x_n < 0, magnitude bucket from |x_n| against CUDA's literal thresholds."""
    thresholds = torch.tensor(cb.FP4_THRESHOLDS, dtype=torch.float32)
    bucket = (xn.abs()[:, None] > thresholds[None, :]).sum(dim=1)
    magnitude = torch.tensor(cb.FP4_BUCKET_TO_CODE, dtype=torch.uint8)[bucket]
    sign = (xn < 0).to(torch.uint8) << 3
    return magnitude | sign


def pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """Even flat index in the high nibble; odd counts padded with the code of 0.0 -> ((n+1)//2, 1)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([pad_code], dtype=torch.uint8)])
    pairs = codes.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).reshape(-1, 1)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    return codes[:numel]


def quantize_4bit(x: torch.Tensor, quant_type, blocksize: int):
    """x (any shape, fp32/fp16/bf16) -> (packed uint8 ((n+1)//2, 1), absmax float32 (nb,))."""
    quant_type = QuantType.parse(quant_type)
    flat = _flat_f32(x)
    absmax = block_absmax(flat, blocksize)
    xn = _normalize(flat, absmax, blocksize)
    codes = codes_nf4(xn) if quant_type is QuantType.NF4 else codes_fp4(xn)
    return pack_nibbles(codes, cb.PAD_CODE[quant_type]), absmax


def lut_4bit(quant_type) -> torch.Tensor:
    quant_type = QuantType.parse(quant_type)
    values = cb.NF4_VALUES if quant_type is QuantType.NF4 else cb.FP4_VALUES
    return torch.tensor(values, dtype=torch.float32)


def dequantize_4bit(packed, absmax, quant_type, blocksize, shape, dtype) -> torch.Tensor:
    """LUT[code] * absmax[block] in float32, then one round-to-nearest-even cast to `dtype`."""
    numel = 1
    for d in shape:
        numel *= int(d)
    codes = unpack_nibbles(packed, numel).long()
    values = lut_4bit(quant_type)[codes]
    scales = absmax.to(torch.float32).repeat_interleave(blocksize)[:numel]
    return (values * scales).to(dtype).reshape(shape)


# ----- 8-bit dynamic-map blockwise (nested absmax of double quant) -----

def _dynamic_map_tensor() -> torch.Tensor:
    return torch.tensor(cb.dynamic_map_signed(), dtype=torch.float32)


def codes_nearest_even(xn: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest entry of a sorted 256-entry map by float32 midpoints; exact-midpoint ties to the even
    index; NaN -> 0 (the CUDA rule, FORMAT.md 2.3)."""
    mids = (code[:-1] + code[1:]) * 0.5
    below = (xn[:, None] > mids[None, :]).sum(dim=1)
    tie_idx = torch.searchsorted(mids, xn.contiguous()).clamp(max=mids.numel() - 1)
    is_tie = mids[tie_idx] == xn
    # On a tie between index i and i+1 (i == tie_idx == below), pick whichever is even.
    tied_choice = below + (below % 2)
    result = torch.where(is_tie, tied_choice, below)
    return torch.where(torch.isnan(xn), torch.zeros_like(result), result).to(torch.uint8)


def quantize_blockwise8(x: torch.Tensor, blocksize: int = cb.NESTED_BLOCKSIZE, code: torch.Tensor | None = None):
    """float32 x -> (uint8 codes (n,), absmax float32 (nb,)); normalization as for 4-bit."""
    code = _dynamic_map_tensor() if code is None else code
    flat = _flat_f32(x)
    absmax = block_absmax(flat, blocksize)
    xn = _normalize(flat, absmax, blocksize)
    return codes_nearest_even(xn, code), absmax


def dequantize_blockwise8(codes, absmax, blocksize: int = cb.NESTED_BLOCKSIZE, code=None) -> torch.Tensor:
    code = _dynamic_map_tensor() if code is None else code
    scales = absmax.repeat_interleave(blocksize)[: codes.numel()]
    return code[codes.long()] * scales


# ----- double quantization of the 4-bit absmax -----

# Elements per torch op in exact_mean_f32: below at::internal::GRAIN_SIZE (32768) torch runs an op on the
# calling thread. On a busy machine torch's intra-op thread pool made the mean of 262k scales take ~200 ms
# instead of ~1 ms, and this runs once per quantized weight.
_SERIAL_CHUNK = 32767


def exact_mean_f32(values: torch.Tensor) -> float:
    """Mean of float32 values, summed exactly and rounded once to float32 (order-independent).

    Every finite float32 is m * 2**e with integer m < 2**24; grouping mantissas by exponent in int64
    keeps the sum exact (2**39 values per exponent before overflow), then Python integers finish it.
    """
    flat = values.detach().reshape(-1).to(torch.float32).contiguous()
    if flat.numel() == 0:
        raise ValueError("mean of an empty tensor")
    bins = torch.zeros(256, dtype=torch.int64)
    for start in range(0, flat.numel(), _SERIAL_CHUNK):
        bits = flat[start:start + _SERIAL_CHUNK].view(torch.int32)
        exponent = (bits >> 23) & 0xFF
        mantissa = (bits & 0x7FFFFF) | ((exponent > 0).to(torch.int32) << 23)  # implicit leading 1
        sign = bits >> 31  # arithmetic shift: -1 for negative values, else 0
        mantissa = ((mantissa ^ sign) - sign).to(torch.int64)  # two's-complement negate where negative
        bins.index_add_(0, exponent.clamp_(min=1), mantissa)  # subnormals scale like e=1
    # value = mantissa * 2**(exponent - 150)
    total = sum(int(c) << int(e) for e, c in enumerate(bins.tolist()) if c)
    return fraction_to_f32(Fraction(total, flat.numel() << 150))


def fraction_to_f32(q: Fraction) -> float:
    """Round an exact rational to the nearest float32, ties to even (finite range only)."""
    if q == 0:
        return 0.0
    sign = -1.0 if q < 0 else 1.0
    q = abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    e = max(e, -126)  # below this the float32 spacing is fixed (subnormals)
    ulp = Fraction(2) ** (e - 23)
    m = round(q / ulp)  # Fraction.__round__ rounds half to even
    return sign * float(m) * float(ulp)


def double_quantize(absmax: torch.Tensor):
    """float32 absmax -> (uint8 codes, nested_absmax float32, offset float) per FORMAT.md 2.1/section 0."""
    offset = exact_mean_f32(absmax)
    centered = absmax.to(torch.float32) - torch.tensor(offset, dtype=torch.float32)
    codes, nested_absmax = quantize_blockwise8(centered, cb.NESTED_BLOCKSIZE)
    return codes, nested_absmax, offset


def dequantize_absmax(codes, nested_absmax, offset: float, nested_blocksize=cb.NESTED_BLOCKSIZE, code=None):
    """code[q] * nested_absmax[i // 256] then + offset, as two float32 roundings (no FMA)."""
    scaled = dequantize_blockwise8(codes, nested_absmax, nested_blocksize, code)
    return scaled + torch.tensor(offset, dtype=torch.float32)


# ----- row-wise int8 (LLM.int8 weight format) -----

def quantize_int8_rowwise(x: torch.Tensor):
    """2-D x (N, K) -> (int8 codes (N, K), SCB float32 (N,)); codes = rne(x * ((1 / SCB) * 127)).

    The scale is rounded twice on purpose: bitsandbytes writes `127.0 / SCB`, which torch evaluates as
    `SCB.reciprocal() * 127`; an IEEE division differs on exact .5 ties (e.g. x = SCB / 2 -> 63 vs 64)."""
    rows = x.detach().to(torch.float32).reshape(x.shape[0], -1)
    scb = rows.abs().amax(dim=1)
    scale = torch.reciprocal(scb) * torch.tensor(127.0, dtype=torch.float32)
    scaled = rows * scale[:, None]
    scaled = torch.where(scb[:, None] == 0, torch.zeros_like(scaled), scaled)
    return torch.round(scaled).to(torch.int8).reshape(x.shape), scb


def dequantize_int8_rowwise(codes: torch.Tensor, scb: torch.Tensor, dtype) -> torch.Tensor:
    """codes * SCB * (1/127) in float32, as bitsandbytes' default path computes it."""
    scale = torch.tensor(cb.INT8_DEQUANT_SCALE, dtype=torch.float32)
    rows = codes.reshape(codes.shape[0], -1).to(torch.float32)
    return ((rows * scb.to(torch.float32)[:, None]) * scale).to(dtype).reshape(codes.shape)
