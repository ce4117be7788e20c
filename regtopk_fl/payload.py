"""The sparse upload as it travels, and honest byte counts.

An upload is (indices, values, J). Raw bytes: int32 indices while J < 2^31
(int64 beyond), values in the dtype sent; a dense upload carries no indices.
Coded bytes: the index set coded losslessly, as the smaller of sorted deltas
in LEB128 varints or a J-bit bitmap, plus a one-byte tag saying which. The
information floor of a k-subset of J entries is log2(C(J, k)) bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Upload:
    values: torch.Tensor  # [k] values sent (dtype as sent)
    indices: torch.Tensor | None  # [k] int64 row-local indices, ascending; None = dense
    dim: int

    @property
    def sent(self) -> int:
        return int(self.values.numel())

    def dense(self) -> torch.Tensor:
        if self.indices is None:
            return self.values.clone()
        out = torch.zeros(self.dim, dtype=self.values.dtype, device=self.values.device)
        out[self.indices] = self.values
        return out


def index_itemsize(dim: int) -> int:
    return 4 if dim < 2**31 else 8


def raw_bytes(up: Upload) -> int:
    idx = 0 if up.indices is None else up.sent * index_itemsize(up.dim)
    return idx + up.sent * up.values.element_size()


_VARINT_STEPS = torch.tensor([1 << b for b in range(7, 63, 7)], dtype=torch.int64)
_VARINT_STEPS_NP = _VARINT_STEPS.numpy()


def varint_lengths(deltas: torch.Tensor) -> torch.Tensor:
    """LEB128 bytes of each non-negative int64: 1 + #{b in 7, 14, ..., 56: d >= 2^b}."""
    return torch.bucketize(deltas, _VARINT_STEPS.to(deltas.device), right=True) + 1


def coded_index_bytes_of_count(count: int, dim: int) -> int | None:
    """The coded bytes of ``count`` ascending indices below ``dim`` where the
    count alone decides: every varint takes at least a byte, so at least as
    many indices as the bitmap has bytes code as the bitmap. None below that
    (the indices themselves decide)."""
    bitmap = (dim + 7) // 8
    return 1 + bitmap if count >= bitmap else None


def coded_index_bytes_rows(idx: torch.Tensor, counts, dim: int) -> list:
    """Coded index bytes of several uploads at once: ``idx`` is their indices
    concatenated (each ascending), ``counts`` their lengths.

    Every varint takes at least one byte, so an upload of at least as many
    indices as the bitmap has bytes codes as the bitmap: when all of them do
    (small J, dense enough uploads) the answer needs no pass over ``idx``."""
    bitmap = (dim + 7) // 8
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if counts and min(counts) >= bitmap:
        return [coded_index_bytes_of_count(counts[0], dim)] * len(counts)
    idx = idx.to(torch.int64)
    if idx.numel() == 0:
        return [1 for _ in counts]
    deltas = idx.clone()
    deltas[1:] -= idx[:-1]
    counts = torch.as_tensor(counts, dtype=torch.int64, device=idx.device)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    nonempty = starts < idx.numel()
    deltas[starts[nonempty]] = idx[starts[nonempty]]  # each upload codes its first index as is
    csum = torch.cumsum(varint_lengths(deltas), 0)
    csum = torch.cat([torch.zeros(1, dtype=torch.int64, device=csum.device), csum])
    varint = (csum[ends] - csum[starts]).tolist()
    return [1 + min(v, bitmap) for v in varint]


def coded_index_bytes(indices, dim: int) -> int:
    """Bytes of the index set under the better of varint-deltas and bitmap."""
    if indices is None:
        return 0
    idx = torch.as_tensor(indices, dtype=torch.int64)
    return coded_index_bytes_rows(idx, [idx.numel()], dim)[0]


def coded_bytes(up: Upload) -> int:
    return coded_index_bytes(up.indices, up.dim) + up.sent * up.values.element_size()


def _varint_encode(deltas: np.ndarray) -> np.ndarray:
    """LEB128 bytes of non-negative int64 ``deltas``, vectorised: one masked
    write per byte position (at most 9 for int64), never a Python loop over
    entries."""
    d = deltas.astype(np.uint64, copy=False)
    lengths = np.searchsorted(_VARINT_STEPS_NP, deltas, side="right") + 1
    starts = np.zeros(d.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for j in range(int(lengths.max()) if d.size else 0):
        live = lengths > j
        byte = (d[live] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[live] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[live] + j] = (byte | more).astype(np.uint8)
    return out


def _varint_decode(buf: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_varint_encode` (vectorised: one masked gather per
    byte position, as the encoder writes them); raises ValueError on a
    truncated stream or a value longer than 9 bytes."""
    if buf.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = (buf & 0x80) == 0
    if not last[-1]:
        raise ValueError("truncated varint stream")
    ends = np.flatnonzero(last)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > 9:
        raise ValueError("varint longer than 9 bytes")
    low = buf & np.uint8(0x7F)
    out = low[starts].astype(np.uint64)
    for j in range(1, longest):
        live = np.flatnonzero(lengths > j)
        out[live] |= low[starts[live] + j].astype(np.uint64) << np.uint64(7 * j)
    return out.astype(np.int64)


def _deltas(indices: np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64)
    return np.diff(idx, prepend=0) if idx.size else idx


def encode_indices(indices, dim: int) -> bytes:
    """Lossless coding of ascending indices: tag 0 + varint deltas (the first
    index coded as is), or tag 1 + a J-bit little-endian bitmap, whichever is
    smaller (ties go to the varints). ``len(result)`` equals
    :func:`coded_index_bytes`, so what is counted is what travels."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices,
                     dtype=np.int64)
    if idx.size and (idx[0] < 0 or idx[-1] >= dim or bool((np.diff(idx) <= 0).any())):
        # duplicates would not survive a bitmap, negative deltas not a varint
        raise ValueError(f"indices must be strictly ascending in [0, {dim})")
    body = _varint_encode(_deltas(idx))
    if body.size <= (dim + 7) // 8:
        return b"\x00" + body.tobytes()
    bitmap = np.zeros(dim, dtype=np.uint8)
    bitmap[idx] = 1
    return b"\x01" + np.packbits(bitmap, bitorder="little").tobytes()


def decode_indices(blob, dim: int) -> np.ndarray:
    """Indices (int64, ascending when the blob was made by :func:`encode_indices`)
    from a coded blob (bytes or a uint8 array). Raises ValueError on a blob no
    encoder could have written; the range and order of what decodes are the
    server's to check (:func:`validate_upload`)."""
    buf = np.frombuffer(blob, dtype=np.uint8) if isinstance(blob, (bytes, bytearray, memoryview)) \
        else np.asarray(blob, dtype=np.uint8).reshape(-1)
    if buf.size == 0:
        raise ValueError("empty index blob (no tag byte)")
    tag, body = int(buf[0]), buf[1:]
    if tag == 1:
        if body.size != (dim + 7) // 8:
            raise ValueError(f"bitmap of {body.size} bytes for J={dim}")
        bits = np.unpackbits(body, bitorder="little", count=dim)
        return np.flatnonzero(bits).astype(np.int64)
    if tag != 0:
        raise ValueError(f"unknown index coding tag {tag}")
    return np.cumsum(_varint_decode(body), dtype=np.int64)


def info_floor_bits(dim: int, k: int) -> float:
    """log2 C(J, k): the fewest bits any code can spend on a k-subset of J."""
    if k <= 0 or k >= dim:
        return 0.0
    return (math.lgamma(dim + 1) - math.lgamma(k + 1) - math.lgamma(dim - k + 1)) / math.log(2)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A sum is finite only if every entry is (an Inf
    or NaN makes it Inf or NaN), so one reduction answers the common case, a
    twentieth of a mask pass over a dense upload (#34); only a sum that is not
    finite (bad entries, or finite ones that overflow) needs the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def validate_upload(indices, values, dim: int, expect_dtype=None) -> str | None:
    """Why an upload must be dropped, or None when it is sound."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        return "values must be a 1-D tensor"
    if not values.is_floating_point():
        return f"values dtype {values.dtype} is not floating point"
    if expect_dtype is not None and values.dtype != expect_dtype:
        return f"values dtype {values.dtype} != model dtype {expect_dtype}"
    if not all_finite(values):
        return "values contain NaN or Inf"
    if indices is None:
        return None if values.numel() == dim else f"dense length {values.numel()} != J={dim}"
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
        return "indices must be a 1-D tensor"
    if indices.dtype not in (torch.int32, torch.int64):
        return f"indices dtype {indices.dtype} is not int32/int64"
    if indices.numel() != values.numel():
        return f"{indices.numel()} indices but {values.numel()} values"
    if indices.numel() == 0:
        return None
    if int(indices.min()) < 0 or int(indices.max()) >= dim:
        return f"index out of range [0, {dim})"
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        srt = torch.sort(indices).values
        if bool((srt[1:] == srt[:-1]).any()):
            return "duplicate indices"
        # the feedback is aligned with the upload's order, which the worker's
        # memory holds ascending; the index coding assumes it too
        return "indices not in ascending order"
    return None
