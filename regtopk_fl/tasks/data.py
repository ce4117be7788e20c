"""CIFAR-10 loading and the partition of a training set across workers.

Sources (``load_cifar10``), decided by ``data_path``:

* the offline archive ``../shared/data/cifar10-jpeg.tar.gz`` (relative to the
  project root; the default): ``train/<class>/NNNN.jpg`` and
  ``test/<class>/NNNN.jpg`` with the classes in CIFAR-10's label order
  (alphabetical). It is decoded once and cached as uint8 arrays in an
  uncompressed ``.npz`` under ``cache_dir`` (default ``results/cache/``), so
  later runs load it in well under a second;
* a directory holding that archive, or the same class-folder tree unpacked;
* a torchvision CIFAR-10 folder (``cifar-10-batches-py`` inside ``data_path``),
  read with ``torchvision.datasets.CIFAR10(root, download=False)``;
* ``download="auto"`` (the config's default, ``task.download``): what is at
  ``data_path`` when it exists; else torchvision's canonical CIFAR-10 in
  ``cache_dir``, fetched there with torchvision (and its progress bar) the
  first time (needs internet; offline, ``settings.validate`` stops the run in
  one line first, naming both ways out);
* ``download=True``: torchvision downloads the canonical CIFAR-10 into
  ``data_path`` (needs internet; machines here have none, and the error says so).

Every result is also kept in a process-level cache, so the tasks of one
process (e.g. several Flower clients) share one copy.

Partitions (``partition_indices``) run flwr-datasets partitioners over local
arrays (``datasets.Dataset.from_dict({"label": ..., "idx": ...})`` assigned
with ``partitioner.dataset = ds``; nothing is downloaded):

* ``iid``: ``IidPartitioner`` over a seeded permutation of the samples;
* ``dirichlet``: ``DirichletPartitioner(alpha, partition_by="label",
  min_partition_size, seed)``;
* ``unequal``: the RegTop-k authors' scheme, random unequal shares with
  max/min >= ``size_ratio`` (uniform(0, 1) shares redrawn until the ratio
  holds, also after rounding to integer sizes); the sizes are drawn with numpy
  and cut by ``SizePartitioner`` from a seeded permutation of the samples.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import socket
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..paths import PROJECT_ROOT, resolve_path

# flwr-datasets sends a usage event to telemetry.flower.ai from some calls
# (plots); machines here are offline, so keep it off unless asked for.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

log = logging.getLogger(__name__)

DEFAULT_DATA_PATH = "../shared/data/cifar10-jpeg.tar.gz"
DOWNLOAD_MODES = (True, False, "auto")
DEFAULT_CACHE_DIR = "results/cache"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_CACHE: dict = {}  # process-level: key -> CifarArrays
_CACHE_VERSION = 1  # bump when the decoded layout changes


@dataclass
class CifarArrays:
    """Images as uint8 [N, 32, 32, 3] (HWC, RGB) and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str = ""


# -- paths ---------------------------------------------------------------------
def data_path_of(path) -> Path:
    """The data at ``path`` (paths.resolve_path), or FileNotFoundError saying
    what was expected there."""
    p = resolve_path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"CIFAR-10 data not found at '{path}' (looked for {p}). Expected the "
            f"offline archive {DEFAULT_DATA_PATH} (relative to the project root), a "
            "directory with the class-folder tree, or a torchvision CIFAR-10 folder "
            "(cifar-10-batches-py); or go online with download=auto or true to let "
            "torchvision fetch it.")
    return p


def download_mode(download):
    """``True``, ``False`` or ``"auto"`` from the config's value (a bool, or its
    text as a flat run config may carry it); ValueError otherwise."""
    text = str(download).strip().lower()
    if text in ("true", "false", "auto"):
        return {"true": True, "false": False}.get(text, "auto")
    raise ValueError(f"download={download!r}: must be one of true, false, auto")


def auto_root(cache_dir) -> Path:
    """Where ``download="auto"`` keeps torchvision's CIFAR-10 (``cifar-10-batches-py``
    inside it): the cache folder."""
    return _cache_dir(cache_dir)


def download_blocker(timeout: float = 3.0) -> str | None:
    """None where torchvision's CIFAR-10 host accepts a connection, else why not
    (one line): what ``settings.validate`` asks before a run that must download."""
    from urllib.parse import urlparse

    from torchvision.datasets import CIFAR10

    host = urlparse(CIFAR10.url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"{host} unreachable ({type(e).__name__}: {e})".replace("\n", " ")
    return None


def _cache_dir(cache_dir) -> Path:
    """The cache folder; a relative one is taken from the project root."""
    p = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR)))
    return p if p.is_absolute() else PROJECT_ROOT / p


# -- subsets -------------------------------------------------------------------
def _per_class_counts(n_total, num_classes=10):
    """``n_total`` spread over the classes: n // C each, one more for the first
    n % C classes."""
    base, extra = divmod(int(n_total), num_classes)
    return [base + (1 if c < extra else 0) for c in range(num_classes)]


def _first_per_class(labels: np.ndarray, counts, offset: int = 0) -> np.ndarray:
    """Indices of the first counts[c] samples of each class c (in data order),
    after the first ``offset`` of each class."""
    keep = []
    for c, k in enumerate(counts):
        keep.append(np.flatnonzero(labels == c)[offset:offset + k])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def _subset_counts(subset_per_class, test_subset):
    train = None if subset_per_class is None else [int(subset_per_class)] * 10
    test = None if test_subset is None else _per_class_counts(test_subset)
    return train, test


def _take(arrs: CifarArrays, subset_per_class, test_subset, offset: int = 0) -> CifarArrays:
    tr, te = _subset_counts(subset_per_class, test_subset)
    xtr, ytr, xte, yte = arrs.x_train, arrs.y_train, arrs.x_test, arrs.y_test
    if tr is None and offset:
        tr = [len(ytr)] * 10  # everything after the offset
    if tr is not None:
        i = _first_per_class(ytr, tr, offset)
        xtr, ytr = xtr[i], ytr[i]
    if te is not None:
        i = _first_per_class(yte, te)
        xte, yte = xte[i], yte[i]
    return CifarArrays(xtr, ytr, xte, yte, arrs.source)


# -- the JPEG archive / tree ----------------------------------------------------
def _tar_members(raw: bytes):
    """(name, offset, size) of the regular files of an uncompressed tar.
    A plain ustar parse (60k members in well under a second); anything
    unusual (long names, pax headers) falls back to the tarfile module."""
    out = []
    pos, n = 0, len(raw)
    try:
        while pos + 512 <= n:
            h = raw[pos:pos + 512]
            if h[0] == 0:
                break
            typ = h[156:157]
            size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            if typ in (b"0", b"\0"):
                name = h[:100].split(b"\0", 1)[0].decode()
                prefix = h[345:500].split(b"\0", 1)[0].decode() if h[257:262] == b"ustar" else ""
                out.append((f"{prefix}/{name}" if prefix else name, pos + 512, size))
            elif typ not in (b"5",):
                raise ValueError(f"tar member type {typ!r}")
            pos += 512 + ((size + 511) // 512) * 512
        return out
    except (ValueError, UnicodeDecodeError):
        out = []
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            for m in tf.getmembers():
                if m.isfile():
                    out.append((m.name, m.offset_data, m.size))
        return out


def _decode_jpegs(blobs: list) -> np.ndarray:
    """Decode RGB JPEGs to uint8 [N, H, W, 3]. torchvision's batched libjpeg
    decoder (several times faster than PIL; the same pixels), PIL otherwise."""
    if not blobs:
        return np.zeros((0, 32, 32, 3), np.uint8)
    try:
        import torch

        ts = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        with warnings.catch_warnings():  # "deprecated since 0.29" (TorchCodec); still works
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            imgs = decode_jpeg(ts, mode=ImageReadMode.RGB)
        return torch.stack(imgs).permute(0, 2, 3, 1).contiguous().numpy()
    except Exception:  # noqa: BLE001 - any decoder problem: use PIL
        from PIL import Image

        first = np.asarray(Image.open(io.BytesIO(blobs[0])).convert("RGB"))
        out = np.empty((len(blobs),) + first.shape, np.uint8)
        for i, b in enumerate(blobs):
            out[i] = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        return out


def _split_class_name(name: str):
    """'train/cat/0001.jpg' (possibly under a top folder) -> ('train', 3, '0001.jpg')."""
    parts = name.replace("\\", "/").strip("/").split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
        return None
    split, cls, fname = parts[-3], parts[-2], parts[-1]
    if split not in ("train", "test") or cls not in CIFAR10_CLASSES:
        return None
    return split, CIFAR10_CLASSES.index(cls), fname


def _select_files(entries, train_counts, test_counts):
    """entries: (split, label, fname, payload). Keep the first counts[label]
    files (by name) per class and split; return per split (payloads, labels)."""
    res = {}
    for split, counts in (("train", train_counts), ("test", test_counts)):
        rows = sorted((lab, fname, pay) for s, lab, fname, pay in entries if s == split)
        if counts is not None:
            seen = [0] * 10
            kept = []
            for lab, fname, pay in rows:
                if seen[lab] < counts[lab]:
                    kept.append((lab, fname, pay))
                    seen[lab] += 1
            rows = kept
        res[split] = ([p for _, _, p in rows], np.array([lab for lab, _, _ in rows], np.int64))
    return res


def _read_jpeg_archive(path: Path, train_counts, test_counts) -> CifarArrays:
    with gzip.open(path, "rb") if path.name.endswith(("gz", "tgz")) else open(path, "rb") as f:
        raw = f.read()
    entries = []
    for name, off, size in _tar_members(raw):
        sc = _split_class_name(name)
        if sc is not None:
            entries.append(sc + ((off, size),))
    if not entries:
        raise ValueError(f"{path}: no train/<class>/*.jpg entries found")
    sel = _select_files(entries, train_counts, test_counts)
    mv = memoryview(raw)
    out = {}
    for split, (pays, labels) in sel.items():
        out[split] = (_decode_jpegs([mv[o:o + s] for o, s in pays]), labels)
    return CifarArrays(out["train"][0], out["train"][1], out["test"][0], out["test"][1],
                       source=str(path))


def _read_jpeg_tree(root: Path, train_counts, test_counts) -> CifarArrays:
    entries = []
    for split in ("train", "test"):
        for lab, cls in enumerate(CIFAR10_CLASSES):
            d = root / split / cls
            if d.is_dir():
                for f in d.iterdir():
                    if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                        entries.append((split, lab, f.name, f))
    sel = _select_files(entries, train_counts, test_counts)
    out = {}
    for split, (files, labels) in sel.items():
        out[split] = (_decode_jpegs([f.read_bytes() for f in files]), labels)
    return CifarArrays(out["train"][0], out["train"][1], out["test"][0], out["test"][1],
                       source=str(root))


def _fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_VERSION}".encode())
    return h.hexdigest()[:12]


def _load_npz(f: Path):
    try:
        with np.load(f) as z:
            return CifarArrays(z["x_train"], z["y_train"], z["x_test"], z["y_test"],
                               source=str(z["source"]))
    except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt
        warnings.warn(f"ignoring unreadable cache {f}: {e}", stacklevel=2)
        return None


def _save_npz(f: Path, a: CifarArrays) -> None:
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, x_train=a.x_train, y_train=a.y_train, x_test=a.x_test,
                 y_test=a.y_test, source=np.array(a.source))
        os.replace(tmp, f)
    except OSError as e:
        warnings.warn(f"could not write the CIFAR-10 cache {f}: {e}", stacklevel=2)


def _cached_decode(src: Path, kind: str, cache_dir, subset_per_class, test_subset):
    """Decode ``src`` (archive or tree) once: the full set is cached as
    ``<name>-<fp>-full.npz``; a subset without the full cache is decoded alone
    (only its images) and cached as ``...-sub<k>-test<m>.npz``."""
    cdir = _cache_dir(cache_dir)
    stem = src.name.split(".")[0]
    fp = _fingerprint(src)
    full = cdir / f"{stem}-{fp}-full.npz"
    subset = subset_per_class is not None or test_subset is not None
    if full.exists():
        a = _load_npz(full)
        if a is not None:
            return _take(a, subset_per_class, test_subset) if subset else a
    read = _read_jpeg_archive if kind == "archive" else _read_jpeg_tree
    if not subset:
        a = read(src, None, None)
        _save_npz(full, a)
        return a
    tag = f"sub{subset_per_class if subset_per_class is not None else 'all'}" \
          f"-test{test_subset if test_subset is not None else 'all'}"
    part = cdir / f"{stem}-{fp}-{tag}.npz"
    if part.exists():
        a = _load_npz(part)
        if a is not None:
            return a
    a = read(src, *_subset_counts(subset_per_class, test_subset))
    _save_npz(part, a)
    return a


# -- torchvision -----------------------------------------------------------------
def _read_torchvision(root: Path, download: bool) -> CifarArrays:
    from torchvision.datasets import CIFAR10

    try:
        tr = CIFAR10(str(root), train=True, download=download)
        te = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as e:  # "Dataset not found or corrupted."
        raise FileNotFoundError(
            f"no torchvision CIFAR-10 in '{root}' (expected {root / 'cifar-10-batches-py'}): "
            f"{e}") from e
    except Exception as e:  # noqa: BLE001 - URLError, socket errors, ...
        if download:
            raise RuntimeError(
                f"downloading CIFAR-10 into '{root}' failed ({type(e).__name__}: {e}). "
                "A download needs internet, and this machine appears to be offline: "
                f"point data_path at the offline archive ({Path(DEFAULT_DATA_PATH).name}) "
                "or a local torchvision CIFAR-10 folder, or run where torchvision can "
                "reach the internet.") from e
        raise
    return CifarArrays(np.asarray(tr.data, np.uint8), np.asarray(tr.targets, np.int64),
                       np.asarray(te.data, np.uint8), np.asarray(te.targets, np.int64),
                       source=str(root))


# -- public ------------------------------------------------------------------------
def load_cifar10(data_path=None, cache_dir=None, subset_per_class=None, test_subset=None,
                 download=False, subset_offset: int = 0) -> CifarArrays:
    """CIFAR-10 as uint8 arrays, from the offline archive (default), a JPEG
    class-folder tree, or a torchvision folder; with ``download="auto"`` from
    torchvision into ``cache_dir`` where ``data_path`` does not exist; see the
    module docstring.

    ``subset_per_class``: keep the first n training images of each class;
    ``test_subset``: keep n test images, the first n // 10 (+1 for the first
    n % 10 classes) of each class; ``subset_offset``: skip the first n
    training images of each class before ``subset_per_class`` (disjoint
    slices: offset 0 and k, k per class each). All deterministic.
    """
    if subset_offset:  # a slice of the full training set (its decode is cached)
        full = load_cifar10(data_path, cache_dir, None, test_subset, download)
        return _take(full, subset_per_class, None, offset=int(subset_offset))
    data_path = data_path or DEFAULT_DATA_PATH
    subset_per_class = None if subset_per_class is None else int(subset_per_class)
    test_subset = None if test_subset is None else int(test_subset)
    download = download_mode(download)
    if download == "auto":
        if resolve_path(data_path).exists():
            download = False
        else:
            root = auto_root(cache_dir)
            key = ("torchvision", str(root), subset_per_class, test_subset)
            if key not in _CACHE:
                if not (root / "cifar-10-batches-py").is_dir():
                    log.warning("CIFAR-10 is not at '%s': torchvision fetches it into %s "
                                "(task.download=auto)", data_path, root)
                _CACHE[key] = _take(_read_torchvision(root, True), subset_per_class,
                                    test_subset)
            return _CACHE[key]
    if download:
        root = resolve_path(data_path)
        key = ("torchvision", str(root), subset_per_class, test_subset)
        if key not in _CACHE:
            if root.suffix in (".gz", ".tgz", ".tar"):
                root = root.parent
            _CACHE[key] = _take(_read_torchvision(root, True), subset_per_class, test_subset)
        return _CACHE[key]
    src = data_path_of(data_path)
    key = (str(src), str(_cache_dir(cache_dir)), subset_per_class, test_subset)
    if key in _CACHE:
        return _CACHE[key]
    if src.is_file():
        a = _cached_decode(src, "archive", cache_dir, subset_per_class, test_subset)
    elif (src / "cifar-10-batches-py").is_dir():
        a = _take(_read_torchvision(src, False), subset_per_class, test_subset)
    elif (src / "train" / CIFAR10_CLASSES[0]).is_dir():
        a = _cached_decode(src, "tree", cache_dir, subset_per_class, test_subset)
    elif (src / Path(DEFAULT_DATA_PATH).name).is_file():
        return load_cifar10(src / Path(DEFAULT_DATA_PATH).name, cache_dir,
                            subset_per_class, test_subset)
    else:
        # let torchvision say what it misses (raises FileNotFoundError)
        a = _take(_read_torchvision(src, False), subset_per_class, test_subset)
    _CACHE[key] = a
    return a


# -- partitions ----------------------------------------------------------------------
def _local_dataset(labels: np.ndarray, class_names=None):
    import datasets

    labels = np.asarray(labels, np.int64)
    k = int(labels.max() + 1 if labels.size else 1)
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    feats = datasets.Features({"label": datasets.ClassLabel(names=names),
                               "idx": datasets.Value("int64")})
    # from_dict(..., features) encodes row by row; an Arrow table does not
    import pyarrow as pa

    table = pa.table({"label": pa.array(labels), "idx": pa.array(np.arange(len(labels)))})
    return datasets.Dataset(table.cast(feats.arrow_schema), info=datasets.DatasetInfo(
        features=feats))


def _permuted(ds, perm: np.ndarray, seed):
    """ds.select(perm) with a given fingerprint (hashing a 50k list takes ~1 s)."""
    return ds.select(perm, new_fingerprint=f"perm-{len(perm)}-{seed}")


def unequal_sizes(n: int, num_workers: int, ratio: float = 5.0, seed: int = 0,
                  max_tries: int = 100000) -> list:
    """Random unequal partition sizes (the authors' scheme): shares drawn
    uniform(0, 1) and normalised, redrawn until max/min >= ``ratio`` (checked
    on the integer sizes, each >= 1)."""
    if num_workers == 1:
        return [int(n)]
    if n < num_workers:
        raise ValueError(f"cannot split {n} samples over {num_workers} workers")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        s = rng.uniform(0.0, 1.0, num_workers)
        if s.min() <= 0 or s.max() / s.min() < ratio:
            continue
        sizes = np.floor(s / s.sum() * n).astype(np.int64)
        rem = n - int(sizes.sum())
        # the remainder to the largest fractional parts (ties: lower id)
        frac = s / s.sum() * n - sizes
        sizes[np.argsort(-frac, kind="stable")[:rem]] += 1
        if sizes.min() >= 1 and sizes.max() / sizes.min() >= ratio:
            return sizes.tolist()
    raise ValueError(f"no unequal split with max/min >= {ratio} for {n} samples over "
                     f"{num_workers} workers")


PARTITION_SCHEMES = ("iid", "dirichlet", "unequal")


def make_partitioner(labels, num_workers: int, scheme: str = "iid", seed: int = 0,
                     alpha: float = 0.5, min_partition_size: int = 10,
                     size_ratio: float = 5.0):
    """The flwr-datasets partitioner for ``scheme`` with a local dataset
    (columns label, idx) assigned."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, SizePartitioner

    labels = np.asarray(labels, np.int64)
    ds = _local_dataset(labels)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        p = IidPartitioner(num_partitions=num_workers)
        ds = _permuted(ds, rng.permutation(len(labels)), seed)  # IidPartitioner shards in order
    elif scheme == "dirichlet":
        p = DirichletPartitioner(num_partitions=num_workers, partition_by="label",
                                 alpha=float(alpha), min_partition_size=int(min_partition_size),
                                 self_balancing=False, shuffle=True, seed=int(seed))
    elif scheme == "unequal":
        sizes = unequal_sizes(len(labels), num_workers, size_ratio, seed)
        p = SizePartitioner([int(s) for s in sizes])
        ds = _permuted(ds, rng.permutation(len(labels)), seed)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r} ({' | '.join(PARTITION_SCHEMES)})")
    p.dataset = ds
    return p


def partition_indices(labels, num_workers: int, scheme: str = "iid", seed: int = 0,
                      alpha: float = 0.5, min_partition_size: int = 10,
                      size_ratio: float = 5.0, cache_dir=None) -> list:
    """One sorted int64 index array (into ``labels``) per worker;
    deterministic given the seed. ``cache_dir``: keep the result there
    (``partition-<key>.npz``, the key made of the labels, every argument and
    the flwr-datasets version), so that a later run reads it back instead of
    importing flwr-datasets (datasets, pyarrow, pandas, scipy: seconds of a
    process's start, #34)."""
    f = None
    if cache_dir is not None:
        f = _cache_dir(cache_dir) / f"partition-{_partition_key(labels, num_workers, scheme, seed, alpha, min_partition_size, size_ratio)}.npz"  # noqa: E501
        parts = _load_partitions(f, num_workers)
        if parts is not None:
            return parts
    p = make_partitioner(labels, num_workers, scheme, seed, alpha, min_partition_size,
                         size_ratio)
    parts = [np.sort(_column(p.load_partition(i), "idx")) for i in range(num_workers)]
    if f is not None:
        _save_partitions(f, parts)
    return parts


def _partition_key(labels, *args) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        fds = version("flwr-datasets")
    except PackageNotFoundError:  # pragma: no cover - a dependency
        fds = "?"
    h = hashlib.sha256(np.ascontiguousarray(np.asarray(labels, np.int64)).tobytes())
    num_workers, scheme, seed, alpha, min_size, ratio = args
    h.update(repr((1, fds, int(num_workers), str(scheme), int(seed), float(alpha), int(min_size),
                   float(ratio))).encode())
    return h.hexdigest()[:16]


def _load_partitions(f: Path, num_workers: int):
    if not f.exists():
        return None
    try:
        with np.load(f) as z:
            idx, bounds = z["idx"], z["bounds"]
        if len(bounds) != num_workers + 1:
            raise ValueError(f"{len(bounds) - 1} partitions, not {num_workers}")
        return [idx[a:b].copy() for a, b in zip(bounds[:-1], bounds[1:])]
    except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt
        warnings.warn(f"ignoring unreadable partition cache {f}: {e}", stacklevel=2)
        return None


def _save_partitions(f: Path, parts: list) -> None:
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npz")
        bounds = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        idx = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        np.savez(tmp, idx=idx, bounds=bounds)
        os.replace(tmp, f)
    except OSError as e:
        warnings.warn(f"could not write the partition cache {f}: {e}", stacklevel=2)


def _column(ds, name) -> np.ndarray:
    """One int64 column of a datasets.Dataset as numpy, read through Arrow
    (iterating the Column object goes row by row: ~10 s for 50k rows)."""
    return np.asarray(ds.with_format("arrow")[:][name].to_numpy(), np.int64)


class _FixedPartitioner:
    """Given index lists as a flwr-datasets Partitioner (for plotting)."""

    def __new__(cls, ds, parts):
        from flwr_datasets.partitioner import Partitioner

        class Fixed(Partitioner):
            def __init__(self):
                super().__init__()
                self._parts = [list(map(int, p)) for p in parts]

            def load_partition(self, partition_id):
                return self.dataset.select(self._parts[partition_id])

            @property
            def num_partitions(self):
                return len(self._parts)

        p = Fixed()
        p.dataset = ds
        return p


def plot_label_distribution(labels, partitions, path, title=None, size_unit="absolute",
                            class_names=CIFAR10_CLASSES):
    """Bar plot of the label counts per worker (flwr-datasets'
    ``plot_label_distributions``) saved as a PNG. Returns the counts
    DataFrame (workers x classes). ``class_names=None``: the label numbers."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from flwr_datasets.common import telemetry
    from flwr_datasets.visualization import plot_label_distributions

    if os.environ.get("FLWR_TELEMETRY_ENABLED") != "1":
        telemetry.FLWR_TELEMETRY_ENABLED = "0"
    p = _FixedPartitioner(_local_dataset(labels, class_names), partitions)
    fig, _, df = plot_label_distributions(
        p, label_name="label", plot_type="bar", size_unit=size_unit, legend=True,
        title=title or f"Label distribution over {len(partitions)} workers")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return df
