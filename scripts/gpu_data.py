"""CIFAR-10 archives for the GPU checks, in the offline archive's layout
(``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``; what
regtopk_fl/tasks/data.py reads):

    python scripts/gpu_data.py reduce SRC DST --train 1000 --test 200
        the first n files (by name) of each class and split of SRC, bytes unchanged
    python scripts/gpu_data.py synthetic DST --train 40 --test 10
        random JPEGs (the CPU smoke test of scripts/gpu_checks.sh)
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from pathlib import Path

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")


def _add(tf: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tf.addfile(info, io.BytesIO(data))


def _write(dst: Path, members) -> dict:
    """``members``: (split, class, file name, bytes) -> a .tar.gz at ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    counts: dict = {}
    with tarfile.open(tmp, "w:gz", format=tarfile.USTAR_FORMAT) as tf:
        for split, cls, fname, data in members:
            _add(tf, f"{split}/{cls}/{fname}", data, 0)
            counts[split] = counts.get(split, 0) + 1
    os.replace(tmp, dst)
    return counts


def reduce(src: Path, dst: Path, train: int, test: int) -> dict:
    """The first ``train`` / ``test`` files of each class (names sorted, as
    data.py selects them), copied byte for byte."""
    keep = {"train": train, "test": test}
    chosen = {}
    with tarfile.open(src, "r:*") as tf:
        for m in tf:
            parts = m.name.strip("/").split("/")
            if not m.isfile() or len(parts) < 3 or parts[-3] not in keep or parts[-2] not in CLASSES:
                continue
            chosen.setdefault((parts[-3], parts[-2]), []).append(
                (parts[-1], tf.extractfile(m).read()))
    members = []
    for split in ("train", "test"):
        for cls in CLASSES:
            files = sorted(chosen.get((split, cls), []))[:keep[split]]
            members += [(split, cls, name, data) for name, data in files]
    return _write(dst, members)


def synthetic(dst: Path, train: int, test: int, seed: int = 0) -> dict:
    """Random 32x32 RGB JPEGs, ``train`` / ``test`` per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    members = []
    for split, n in (("train", train), ("test", test)):
        for c, cls in enumerate(CLASSES):
            for i in range(n):
                img = (rng.random((32, 32, 3)) * 64 + c * 19).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                members.append((split, cls, f"{i:04d}.jpg", buf.getvalue()))
    return _write(dst, members)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reduce")
    r.add_argument("src", type=Path)
    r.add_argument("dst", type=Path)
    s = sub.add_parser("synthetic")
    s.add_argument("dst", type=Path)
    for p, tr, te in ((r, 1000, 200), (s, 40, 10)):
        p.add_argument("--train", type=int, default=tr, help="files per class, train split")
        p.add_argument("--test", type=int, default=te, help="files per class, test split")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.cmd == "reduce":
        counts = reduce(args.src, args.dst, args.train, args.test)
    else:
        counts = synthetic(args.dst, args.train, args.test)
    size = args.dst.stat().st_size
    print(f"{args.dst}: {counts.get('train', 0)} train + {counts.get('test', 0)} test images, "
          f"{size / 2**20:.2f} MiB ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
