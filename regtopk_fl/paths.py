"""Where the project lives and what a user's relative path means."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


def resolve_path(path) -> Path:
    """An absolute path as given (``~`` expanded); a relative one against the
    working directory where it exists there, else against the project root
    (Hydra may change the working directory, and the presets' data paths,
    such as ``../shared/data/cifar10-jpeg.tar.gz``, are written from the
    project root)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        return p
    here = Path.cwd() / p
    return (here if here.exists() else PROJECT_ROOT / p).resolve()
