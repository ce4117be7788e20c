"""Upload bytes, index coding and upload validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regtopk_fl.payload import (Upload, coded_bytes, coded_index_bytes, coded_index_bytes_rows,
                                decode_indices, encode_indices, index_itemsize, info_floor_bits,
                                raw_bytes, validate_upload)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
I64 = torch.int64


def up(idx, vals, dim, dtype=torch.float32):
    return Upload(torch.tensor(vals, dtype=dtype),
                  None if idx is None else torch.tensor(idx, dtype=I64), dim)


# -- raw bytes ------------------------------------------------------------------
def test_index_itemsize_switches_at_2_pow_31():
    assert index_itemsize(2**31 - 1) == 4
    assert index_itemsize(2**31) == 8


def test_raw_bytes_hand():
    # 3 int32 indices + 3 float32 values = 12 + 12
    assert raw_bytes(up([0, 5, 9], [1.0, 2.0, 3.0], 100)) == 24
    # float64 values: 12 + 24
    assert raw_bytes(up([0, 5, 9], [1.0, 2.0, 3.0], 100, torch.float64)) == 36
    # J >= 2^31: int64 indices: 24 + 12
    assert raw_bytes(up([0, 5, 9], [1.0, 2.0, 3.0], 2**31)) == 36
    # dense: values only, 10 float32
    assert raw_bytes(up(None, [0.0] * 10, 10)) == 40
    assert raw_bytes(up([], [], 100)) == 0


# -- index coding -------------------------------------------------------------------
def test_varint_coding_hand():
    # indices [0, 1, 130, 20000] -> deltas [0, 1, 129, 19870]
    # LEB128: 0 -> 00; 1 -> 01; 129 = 1*128 + 1 -> 81 01;
    # 19870 = 1*16384 + 27*128 + 30 -> 9e 9b 01   (7 bytes, bitmap would be 2501)
    idx = [0, 1, 130, 20000]
    blob = encode_indices(idx, 20001)
    assert blob == bytes([0, 0x00, 0x01, 0x81, 0x01, 0x9E, 0x9B, 0x01])
    assert coded_index_bytes(torch.tensor(idx), 20001) == 8
    assert decode_indices(blob, 20001).tolist() == idx


def test_bitmap_coding_hand():
    # J = 16, indices [0, 1, 2, 3, 8, 15]: varint deltas [0,1,1,1,5,7] = 6 bytes,
    # bitmap 2 bytes (little bit order): 0b00001111 = 0x0f, 0b10000001 = 0x81
    idx = [0, 1, 2, 3, 8, 15]
    blob = encode_indices(idx, 16)
    assert blob == bytes([1, 0x0F, 0x81])
    assert coded_index_bytes(torch.tensor(idx), 16) == 3
    assert decode_indices(blob, 16).tolist() == idx
    # J = 10 (bitmap padded to 2 bytes): [0, 1, 2, 9] -> varint 4 > bitmap 2
    blob = encode_indices([0, 1, 2, 9], 10)
    assert blob == bytes([1, 0x07, 0x02])
    assert decode_indices(blob, 10).tolist() == [0, 1, 2, 9]


def test_tie_prefers_varint_and_sizes_agree():
    # J = 8: bitmap 1 byte; [3] -> varint 1 byte: tag 0 wins the tie
    assert encode_indices([3], 8) == bytes([0, 3])
    assert coded_index_bytes(torch.tensor([3]), 8) == 2


def test_empty_and_dense_index_sets():
    assert encode_indices([], 50) == bytes([0])
    assert decode_indices(encode_indices([], 50), 50).tolist() == []
    assert coded_index_bytes(torch.zeros(0, dtype=I64), 50) == 1
    assert coded_index_bytes(None, 50) == 0  # dense upload: no index part
    full = list(range(50))
    assert len(encode_indices(full, 50)) == coded_index_bytes(torch.tensor(full), 50) == 1 + 7


def test_large_dim_varint():
    # J = 2^40: 2^35 needs 36 bits -> 6 LEB128 bytes; no bitmap is ever built
    idx = [0, 2**35, 2**35 + 1]
    blob = encode_indices(idx, 2**40)
    assert len(blob) == 1 + 1 + 6 + 1 == coded_index_bytes(torch.tensor(idx), 2**40)
    assert decode_indices(blob, 2**40).tolist() == idx


def test_coded_bytes_adds_values():
    u = up([0, 1, 130, 20000], [1.0, 2.0, 3.0, 4.0], 20001)
    assert coded_bytes(u) == 8 + 16
    assert coded_bytes(up(None, [0.0] * 10, 10)) == 40


def test_coded_index_bytes_rows_hand():
    # rows [1, 2] | [] | [0, 300], J = 1000 (bitmap 125 bytes):
    #   row 0: deltas [1, 1] -> 2 + tag = 3;  row 1: empty -> tag only = 1
    #   row 2: deltas [0, 300] -> 1 + 2 + tag = 4 (its first index is coded as is)
    idx = torch.tensor([1, 2, 0, 300])
    assert coded_index_bytes_rows(idx, [2, 0, 2], 1000) == [3, 1, 4]


def test_coded_rows_at_the_bitmap_boundary():
    # J = 80: a bitmap of 10 bytes. 9 adjacent indices code as 9 one-byte
    # varints (+ tag); 10 as the bitmap, which the count alone decides
    dim = 80
    for k, want in ((9, 1 + 9), (10, 1 + 10), (11, 1 + 10), (80, 1 + 10)):
        idx = torch.arange(k)
        assert coded_index_bytes(idx, dim) == want == len(encode_indices(idx, dim))
        assert coded_index_bytes_rows(torch.cat([idx, idx]), [k, k], dim) == [want, want]
    # one short row among long ones: each row still its own size
    assert coded_index_bytes_rows(torch.cat([torch.arange(12), torch.arange(3)]),
                                  [12, 3], dim) == [11, 4]


@st.composite
def index_sets(draw):
    dim = draw(st.sampled_from([1, 7, 8, 9, 64, 200, 1000, 5000, 2**20, 2**31 + 5]))
    size = draw(st.integers(0, min(dim, 300)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if dim <= 5000:
        idx = np.sort(rng.choice(dim, size=size, replace=False))
    else:
        idx = np.unique(rng.integers(0, dim, size=size))
    return dim, idx.astype(np.int64)


@SETTINGS
@given(index_sets())
def test_encode_decode_round_trip_and_sizes(case):
    dim, idx = case
    blob = encode_indices(idx, dim)
    assert decode_indices(blob, dim).tolist() == idx.tolist()
    assert len(blob) == coded_index_bytes(torch.from_numpy(idx), dim)
    # never more than a bitmap plus its tag
    assert len(blob) <= 1 + (dim + 7) // 8


@SETTINGS
@given(st.lists(index_sets().filter(lambda c: c[0] < 2**31), min_size=1, max_size=4))
def test_coded_rows_equal_single_uploads(cases):
    dim = cases[0][0]
    sets = [c[1][c[1] < dim] for c in cases]
    cat = torch.from_numpy(np.concatenate(sets)) if sets else torch.zeros(0, dtype=I64)
    got = coded_index_bytes_rows(cat, [len(s) for s in sets], dim)
    assert got == [coded_index_bytes(torch.from_numpy(s), dim) for s in sets]


def test_info_floor_hand():
    assert info_floor_bits(4, 2) == pytest.approx(math.log2(6))  # C(4,2) = 6
    assert info_floor_bits(100, 1) == pytest.approx(math.log2(100))
    assert info_floor_bits(10, 3) == pytest.approx(math.log2(120))  # C(10,3) = 120
    assert info_floor_bits(10, 0) == 0.0 and info_floor_bits(10, 10) == 0.0
    # symmetric: C(J, k) = C(J, J - k)
    assert info_floor_bits(1000, 10) == pytest.approx(info_floor_bits(1000, 990))


def test_coding_is_close_to_the_floor_for_random_sets():
    # a uniformly random k-subset: varint deltas within ~1.5x of log2 C(J, k)
    rng = np.random.default_rng(0)
    dim, k = 1_000_000, 1000
    idx = np.sort(rng.choice(dim, size=k, replace=False))
    bits = 8 * coded_index_bytes(torch.from_numpy(idx), dim)
    floor = info_floor_bits(dim, k)
    assert floor < bits < 1.5 * floor


# -- Upload ---------------------------------------------------------------------------
def test_upload_dense_and_sent():
    u = up([1, 3], [2.0, -1.0], 5)
    assert u.sent == 2
    assert u.dense().tolist() == [0.0, 2.0, 0.0, -1.0, 0.0]
    d = up(None, [1.0, 2.0], 2)
    assert d.dense().tolist() == [1.0, 2.0] and d.dense() is not d.values


# -- validation -----------------------------------------------------------------------
F32 = torch.float32


@pytest.mark.parametrize("indices, values, dim, expect, why", [
    (torch.tensor([0, 3, 5]), torch.tensor([1.0, 2.0, 3.0]), 6, F32, None),
    (torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([1.0, 2.0, 3.0]), 6, F32, None),
    # unique but descending: the feedback g[idx] follows the upload's order, the
    # worker's memory holds it ascending (and the index coding assumes it)
    (torch.tensor([5, 0]), torch.tensor([1.0, 2.0]), 6, F32, "not in ascending order"),
    (torch.zeros(0, dtype=I64), torch.zeros(0), 6, F32, None),
    (None, torch.zeros(6), 6, F32, None),
    (torch.tensor([0, 6]), torch.tensor([1.0, 2.0]), 6, F32, "out of range"),
    (torch.tensor([-1, 2]), torch.tensor([1.0, 2.0]), 6, F32, "out of range"),
    (torch.tensor([1, 1, 2]), torch.tensor([1.0, 2.0, 3.0]), 6, F32, "duplicate"),
    (torch.tensor([2, 1, 2]), torch.tensor([1.0, 2.0, 3.0]), 6, F32, "duplicate"),
    (torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0]), 6, F32, "3 indices but 2 values"),
    (torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]), 6, F32, "NaN or Inf"),
    (torch.tensor([0, 1]), torch.tensor([float("-inf"), 1.0]), 6, F32, "NaN or Inf"),
    (None, torch.tensor([float("nan")] * 6), 6, F32, "NaN or Inf"),
    (torch.tensor([0, 1]), torch.tensor([1.0, 2.0], dtype=torch.float64), 6, F32, "float64"),
    (torch.tensor([0, 1]), torch.tensor([1, 2]), 6, None, "not floating point"),
    (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]), 6, F32, "not int32/int64"),
    (torch.tensor([0, 1], dtype=torch.int16), torch.tensor([1.0, 2.0]), 6, F32,
     "not int32/int64"),
    (torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), 6, F32, "1-D"),
    (torch.tensor([0, 1]), torch.tensor([[1.0, 2.0]]), 6, F32, "1-D"),
    (torch.tensor([0, 1]), [1.0, 2.0], 6, F32, "1-D tensor"),
    (None, torch.zeros(5), 6, F32, "dense length 5"),
])
def test_validate_upload(indices, values, dim, expect, why):
    got = validate_upload(indices, values, dim, expect)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got, got


@pytest.mark.parametrize("idx", [[5, 3], [1, 1, 2], [-1, 2], [0, 10]])
def test_encode_rejects_what_it_cannot_code(idx):
    # unsorted input used to loop forever (a negative delta never reaches 0 by >> 7)
    with pytest.raises(ValueError, match="strictly ascending"):
        encode_indices(idx, 10)


def test_varint_decode_round_trips_every_length_and_refuses_bad_streams():
    """Deltas of every byte length (1..9) come back exactly; a stream cut in
    a varint, or a varint of 10 bytes, is refused (no encoder writes one)."""
    from regtopk_fl.payload import _varint_decode, _varint_encode

    rng = np.random.default_rng(5)
    for _ in range(200):
        bits = rng.integers(0, 63, int(rng.integers(1, 200)))
        d = rng.integers(0, 2**62, bits.size, dtype=np.int64) >> (62 - bits)
        d[: min(d.size, 9)] = [(1 << (7 * j)) - 1 for j in range(1, min(d.size, 9) + 1)]
        assert np.array_equal(_varint_decode(_varint_encode(d)), d)
    with pytest.raises(ValueError, match="truncated"):
        _varint_decode(np.array([0x05, 0x81], dtype=np.uint8))
    with pytest.raises(ValueError, match="longer than 9 bytes"):
        _varint_decode(np.array([0x80] * 9 + [0x01], dtype=np.uint8))
    assert np.array_equal(_varint_decode(np.array([0x80] * 8 + [0x01], dtype=np.uint8)),
                          [1 << 56])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_the_mask_check_where_the_sum_misleads(dtype):
    from regtopk_fl.payload import all_finite

    big = torch.finfo(dtype).max
    cases = {
        "finite": torch.tensor([1.0, -2.0, 3.0]),
        "empty": torch.zeros(0),
        "overflowing sum of finite entries": torch.tensor([big, big, -1.0]),
        "nan": torch.tensor([1.0, float("nan"), 2.0]),
        "inf": torch.tensor([0.0, float("inf")]),
        "cancelling infs": torch.tensor([float("inf"), float("-inf")]),
        "a lone -inf in many": torch.cat([torch.randn(100_000), torch.tensor([float("-inf")])]),
    }
    for name, t in cases.items():
        t = t.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), name
    assert all_finite(torch.tensor([big, big], dtype=dtype))  # the sum overflows; the entries do not
