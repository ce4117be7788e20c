"""In-place state files for simulated clients.

Under the launcher's Flower simulation the clients' state lives in a per-run
directory on /dev/shm (``runtime.state_dir``, set by simulation/
together with ``runtime.state_inplace``). Any Ray actor may serve a node's
next message, so the state must be in a place every actor reads; Flower's
Context would carry it to and from the actor with every message. Here each
J-sized tensor (the residual, the replica's parameters and momentum) is a raw
file mapped *shared*: a round updates it where it lies (``eps += g``, the
optimizer step) instead of reading and writing 45 MB per tensor for
ResNet-18. The small rest goes into ``<base>.meta``: a JSON header and the
small tensors' bytes (:func:`pack`), read and written in tens of
microseconds, where ``torch.save`` / ``torch.load`` of the same dict cost
0.12 / 0.29 ms, twice each per message (the memory and the replica).

A GPU client copies the residual and the replica's parameters to the GPU
and the residual back with every message (about 135 MB for ResNet-18). From
pageable memory the driver stages each copy through a bounce buffer; so
:func:`pin_mapped` registers each mapping with CUDA once per process
(``cudaHostRegister``: the pages stay where they are and the copies become
direct DMA). A mapping is unregistered before it is dropped.
``REGTOPK_PIN_STATE=0`` in the environment leaves them pageable (the GPU
checks' comparison, scripts/gpu_bench.py).

Not crash-safe, by design: the directory is the run's scratch space, removed
at the end; a resumed run restores the memories from its checkpoint and
resyncs the replicas. A SuperNode's ``state-dir`` keeps whole-file atomic
writes (clients/client_app.py).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from regtopk_fl.results import atomic_write

log = logging.getLogger(__name__)

BIG = 1 << 16  # tensors of at least this many entries get a mapped file
# file -> (the mapped tensor, (inode, size) of the file it maps); kept alive:
# its address is its identity, and its pages stay mapped between messages
_MAPPED: dict = {}
_PINNED: dict = {}  # file -> address registered with CUDA (pin_mapped)
_PIN_FAILED: list = []  # why registering failed in this process (then never tried again)


def _raw(base: Path, key: str) -> Path:
    return base.with_name(f"{base.name}.{key}.raw")


def _meta(base: Path) -> Path:
    return base.with_name(f"{base.name}.meta")


def pack(small: dict) -> bytes:
    """``small`` as bytes: an 8-byte header length, a JSON header (each key's
    plain value, or a tensor's dtype, shape, offset and size, or a mapped
    tensor's ``("mapped", shape, dtype)``), then the tensors' bytes."""
    head, blobs, offset = {}, [], 0
    for key, value in small.items():
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            head[key] = {"tensor": [str(t.dtype).split(".")[-1], list(value.shape), offset,
                                    len(raw)]}
            blobs.append(raw)
            offset += len(raw)
        elif isinstance(value, tuple) and len(value) == 3 and value[0] == "mapped":
            head[key] = {"mapped": [list(value[1]), value[2]]}
        elif value is None or type(value) in (int, float, str, bool):
            head[key] = {"value": value}
        else:  # it would not come back as it went (a tuple as a list, numpy scalars)
            raise TypeError(f"state {key}={value!r}: a tensor, int, float, str, bool or None")
    text = json.dumps(head).encode()
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def unpack(data: bytes) -> dict:
    """What :func:`pack` packed (tensors in memory of their own)."""
    n = int.from_bytes(data[:8], "little")
    head, start = json.loads(data[8:8 + n]), 8 + n
    out = {}
    for key, item in head.items():
        if "tensor" in item:
            dtype, shape, offset, size = item["tensor"]
            dtype = getattr(torch, dtype)
            flat = (torch.frombuffer(bytearray(data[start + offset:start + offset + size]),
                                     dtype=dtype) if size else torch.empty(0, dtype=dtype))
            out[key] = flat.reshape(shape)
        elif "mapped" in item:
            out[key] = ("mapped", tuple(item["mapped"][0]), item["mapped"][1])
        else:
            out[key] = item["value"]
    return out


def _map(path: Path, numel: int, dtype) -> torch.Tensor:
    """A shared mapping of ``path``: the one this process holds already, if
    the file is still the one it maps (same inode and size: another actor
    may have replaced it) with the same numel and dtype, else a new one. A
    new mapping faults every page in again when the round touches it (for
    the 45 MB of ResNet-18's residual or replica, ~3 ms a file here)."""
    key = str(path)
    held = _MAPPED.get(key)
    if held is not None:
        t, ident = held
        try:
            st = os.stat(key)
        except FileNotFoundError:
            st = None
        if (st is not None and (st.st_ino, st.st_size) == ident and t.numel() == numel
                and t.dtype == dtype):
            return t
    _unpin(key)
    t = torch.from_file(key, shared=True, size=int(numel), dtype=dtype)
    st = os.stat(key)
    _MAPPED[key] = (t, (st.st_ino, st.st_size))
    return t


def save(base: Path, state: dict, extra: dict | None = None) -> None:
    """Big tensors into their mapped files (a no-op for a tensor that already
    is that mapping; a GPU tensor is copied into its mapping of the same
    size), the rest and ``extra`` into ``<base>.meta`` (:func:`pack`)."""
    small = dict(extra or {})
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel() >= BIG:
            path = _raw(base, key)
            nbytes = value.numel() * value.element_size()
            try:
                fits = os.stat(path).st_size == nbytes
            except FileNotFoundError:
                fits = False
            if not fits and path.exists():
                path.unlink()  # a new file: never resize a mapping another tensor holds
            # the file of the same size is written where it lies (this
            # process's mapping, or one of the file another actor wrote):
            # a new file would fault in every page again (#34)
            mapped = _map(path, value.numel(), value.dtype)
            if mapped.data_ptr() != value.data_ptr():  # not already the mapping
                mapped.copy_(value.detach().reshape(-1))  # a GPU tensor: device to host
            small[key] = ("mapped", tuple(value.shape), str(value.dtype).split(".")[-1])
        else:
            small[key] = value
    data = pack(small)
    atomic_write(_meta(base), lambda fh: fh.write(data), "wb")


def load(base: Path) -> dict | None:
    """The state saved at ``base`` (big tensors as shared mappings), or None."""
    try:
        small = unpack(_meta(base).read_bytes())
    except FileNotFoundError:
        return None
    out = {}
    for key, value in small.items():
        if isinstance(value, tuple) and len(value) == 3 and value[0] == "mapped":
            shape, dtype = value[1], getattr(torch, value[2])
            numel = 1
            for d in shape:
                numel *= int(d)
            out[key] = _map(_raw(base, key), numel, dtype).view(shape)
        else:
            out[key] = value
    return out


def _cudart():
    return torch.cuda.cudart()


def pin_mapped() -> int:
    """Register every mapping this process holds and has not registered yet
    with CUDA (page-locked where it lies); returns how many are registered.
    A failure (no CUDA, a refusing driver, a memlock limit) is logged once
    and turns pinning off for the process: the copies then stay pageable,
    with the same results."""
    if _PIN_FAILED or os.environ.get("REGTOPK_PIN_STATE") == "0":  # 0: the A/B's other arm
        return len(_PINNED)
    for key, (t, _) in list(_MAPPED.items()):
        if key in _PINNED or t.numel() == 0:
            continue
        try:
            err = _cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
            code = getattr(err, "value", err)
            if code != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
        except Exception as exc:  # noqa: BLE001 - pageable copies still work
            _clear_cuda_error()  # else the next kernel launch would report this failure
            _PIN_FAILED.append(f"{type(exc).__name__}: {exc}")
            log.warning("state files stay pageable (GPU copies not pinned): %s", _PIN_FAILED[0])
            return len(_PINNED)
        _PINNED[key] = t.data_ptr()
    return len(_PINNED)


def _clear_cuda_error() -> bool:
    """Reset CUDA's last error after a refused registration: torch checks
    every kernel launch with ``cudaGetLastError`` and would raise this one
    there. torch's bindings offer no reset, so it is called in the CUDA
    runtime this process loaded (found in /proc/self/maps); False where there
    is none (no CUDA, a static runtime)."""
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()  # the loaded copy: same handle
        return bool(paths)
    except Exception:  # noqa: BLE001 - best effort; the warning says what failed
        return False


def _unpin(key: str) -> None:
    """Unregister a mapping before it is dropped (its pages are unmapped
    when the tensor goes)."""
    ptr = _PINNED.pop(key, None)
    if ptr is not None:
        try:
            _cudart().cudaHostUnregister(ptr)
        except Exception as exc:  # noqa: BLE001 - the process keeps working
            log.warning("cudaHostUnregister of %s failed: %s", key, exc)


def remove(base: Path) -> None:
    for path in [_meta(base), *base.parent.glob(f"{base.name}.*.raw")]:
        _unpin(str(path))
        _MAPPED.pop(str(path), None)
        if path.exists():
            path.unlink()
