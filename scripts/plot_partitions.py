"""Label distribution per worker for an image task's partition, one command:

    python scripts/plot_partitions.py task=cifar10 num_workers=8 task.partition=dirichlet task.alpha=0.3 [--out results/partitions.png]

Takes the launcher's overrides (the same Hydra config), builds the task's
partition exactly as a run would, and draws it with flwr-datasets.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for regtopk-fl")
    ap.add_argument("--out", default="results/partitions.png")
    args = ap.parse_args(argv)
    from regtopk_fl.runner import build
    from regtopk_fl.settings import CONF_DIR, ConfigError, validate
    from regtopk_fl.tasks.data import CIFAR10_CLASSES, plot_label_distribution

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args.overrides)
    try:
        validate(cfg)
    except ConfigError as exc:
        print(f"plot_partitions: error: {exc}", file=sys.stderr)
        return 2
    if cfg.task.name not in ("cifar10", "tiny_image"):
        print(f"plot_partitions: error: task={cfg.task.name!r}: only image tasks have label "
              "partitions", file=sys.stderr)
        return 2
    task, _ = build(cfg)
    part = cfg.task.partition + (f" (alpha={cfg.task.alpha})" if cfg.task.partition == "dirichlet" else "")
    df = plot_label_distribution(task.y_train.cpu().numpy(), [p.numpy() for p in task.partitions],
                                 Path(args.out), title=f"{cfg.task.name}: {part}, N={cfg.num_workers}",
                                 class_names=CIFAR10_CLASSES if cfg.task.name == "cifar10" else None)
    print(df.to_string())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
