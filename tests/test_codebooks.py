"""The code tables and thresholds of converter.formats.codebooks against FORMAT.md and ../shared."""
import struct

import pytest
import torch

from converter.formats import codebooks as cb
from converter.formats.codebooks import QuantType

from shared_data import SHARED


def bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


# FORMAT.md 1.1, copied from the spec tables (not from the module under test).
NF4_HEX = [
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
]
FP4_MAG_HEX = [0x0, 0x3BAAAAAB, 0x3F2AAAAB, 0x3F800000, 0x3EAAAAAB, 0x3F000000, 0x3E2AAAAB, 0x3E800000]
FP4_LITERAL_HEX = [0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555]
NF4_THRESHOLDS_DECIMAL = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544, -0.23460740596055984,
    -0.13791173323988914, -0.045525018125772476, 0.03979014977812767, 0.1202552504837513, 0.2035212516784668,
    0.2920137718319893, 0.3893125355243683, 0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def test_nf4_table_matches_format_md():
    """NF4 values are exactly the float32 bit patterns of FORMAT.md 1.1, sorted ascending."""
    assert [bits(v) for v in cb.NF4_VALUES] == NF4_HEX
    assert list(cb.NF4_VALUES) == sorted(cb.NF4_VALUES)


def test_nf4_thresholds_are_float32_midpoints_computed_in_torch():
    """The 15 NF4 thresholds equal (c[i] + c[i+1]) / 2 evaluated in torch float32, and CUDA's literals."""
    table = torch.tensor(NF4_HEX, dtype=torch.int64).to(torch.int32).view(torch.float32)
    mids = (table[:-1] + table[1:]) / 2
    assert [bits(t) for t in cb.NF4_THRESHOLDS] == [bits(m) for m in mids.tolist()]
    literal = torch.tensor(NF4_THRESHOLDS_DECIMAL, dtype=torch.float32)
    assert torch.equal(literal, mids)


def test_fp4_table_matches_format_md():
    """FP4 magnitudes per 3-bit code equal FORMAT.md 1.1; codes 8..15 negate 0..7 and code 8 is -0.0."""
    assert [bits(v) for v in cb.FP4_VALUES[:8]] == FP4_MAG_HEX
    for code in range(8):
        assert cb.FP4_VALUES[code + 8] == -cb.FP4_VALUES[code]
    assert bits(cb.FP4_VALUES[8]) == 0x80000000
    # Raw magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 in float32.
    raw = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32) / 12
    assert torch.equal(raw, torch.tensor(cb.FP4_VALUES[:8], dtype=torch.float32))


def test_fp4_thresholds_are_cuda_literals_not_midpoints():
    """FP4 thresholds are CUDA's literal constants (FORMAT.md 1.3), which differ from some midpoints."""
    assert [bits(t) for t in cb.FP4_THRESHOLDS] == FP4_LITERAL_HEX
    decimals = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]
    assert torch.equal(torch.tensor(decimals, dtype=torch.float32), torch.tensor(cb.FP4_THRESHOLDS))
    # Sorted magnitudes in bucket order; the midpoint of 0.5 and 0.6667 is 6 ulp above the literal.
    sorted_mags = torch.tensor([cb.FP4_MAGNITUDES[c] for c in cb.FP4_BUCKET_TO_CODE], dtype=torch.float32)
    assert torch.all(sorted_mags[1:] > sorted_mags[:-1])
    mids = ((sorted_mags[:-1] + sorted_mags[1:]) / 2).tolist()
    assert bits(mids[5]) - FP4_LITERAL_HEX[5] == 6
    assert bits(mids[0]) - FP4_LITERAL_HEX[0] == -14


def test_fp4_value_sort_order():
    """Sorted by value the FP4 codes are 11, 10, 13, 12, 15, 14, 9, {0, 8}, 1, 6, 7, 4, 5, 2, 3 (FORMAT.md 1.1)."""
    order = sorted(range(16), key=lambda c: (cb.FP4_VALUES[c], -c))
    assert order == [11, 10, 13, 12, 15, 14, 9, 8, 0, 1, 6, 7, 4, 5, 2, 3]


def test_dynamic_map_matches_shared_tsv():
    """The 8-bit signed dynamic map equals ../shared/dynamic_map_signed.tsv entry for entry (bit patterns)."""
    rows = (SHARED / "dynamic_map_signed.tsv").read_text().split("\n")[1:]
    expected = [int(r.split("\t")[2], 16) for r in rows if r.strip()]
    assert len(expected) == 256
    assert [bits(v) for v in cb.dynamic_map_signed()] == expected


def test_dynamic_map_structure():
    """Map is sorted, unique, symmetric around code[127] = 0, tops at 1.0 and cannot represent -1.0."""
    code = cb.dynamic_map_signed()
    assert all(a < b for a, b in zip(code, code[1:]))
    assert code[127] == 0.0 and code[255] == 1.0
    assert all(code[127 - k] == -code[127 + k] for k in range(1, 128))
    assert code[0] == struct.unpack("<f", struct.pack("<I", 0xBF7E3333))[0]


def test_pad_codes_are_the_codes_of_zero():
    """The odd-count pad code decodes to 0.0 (NF4 7, FP4 0)."""
    assert cb.NF4_VALUES[cb.PAD_CODE[QuantType.NF4]] == 0.0
    assert cb.FP4_VALUES[cb.PAD_CODE[QuantType.FP4]] == 0.0


def test_blocksizes_and_constants():
    """4-bit blocksizes are the powers of two 32..4096; nested blocksize 256; int8 scale is float32(1/127)."""
    assert cb.BLOCKSIZES_4BIT == tuple(2**k for k in range(5, 13))
    assert cb.NESTED_BLOCKSIZE == 256
    assert bits(cb.INT8_DEQUANT_SCALE) == bits(1 / 127)


@pytest.mark.parametrize("raw,expected", [("nf4", QuantType.NF4), ("FP4", QuantType.FP4), ("int8", QuantType.INT8),
                                          (QuantType.NF4, QuantType.NF4)])
def test_quant_type_parse(raw, expected):
    """QuantType.parse accepts names case-insensitively and enum members."""
    assert QuantType.parse(raw) is expected


def test_quant_type_parse_rejects_unknown():
    """An unknown quant type names itself and the accepted values."""
    with pytest.raises(ValueError, match=r"'nf3'.*nf4, fp4, int8"):
        QuantType.parse("nf3")
    assert QuantType.NF4.is_4bit and QuantType.FP4.is_4bit and not QuantType.INT8.is_4bit
