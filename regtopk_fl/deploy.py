"""From a Hydra config to a Flower deployment run (``flwr run``).

The Flower app of this project (pyproject.toml, ``[tool.flwr.app]``) declares
its run config in ``[tool.flwr.app.config]``: the same dotted keys that
:func:`regtopk_fl.settings.to_run_config` produces ("task.name",
"sparsifier.sparsity", ...), for the union of all task / sparsifier choices
(``flwr run --run-config`` may only set declared keys), with the defaults of
the default config under ``runtime=flower``, plus ``output_dir``. The apps
drop the keys of the choices not taken (settings.from_run_config).

* :func:`flwr_run_command` - the ``flwr run`` command line that runs a resolved
  config on a SuperLink (``regtopk-fl ... print_flwr_run=true`` prints it);
* :func:`app_config_defaults` / ``python -m regtopk_fl.deploy pyproject`` -
  the ``[tool.flwr.app.config]`` table (tests check pyproject.toml matches).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .paths import CONF_DIR, PROJECT_ROOT, resolve_path
from .settings import (EXTRA_KEY, config_groups, group_option_keys, to_run_config,
                       validate)

DEFAULT_CONNECTION = "regtopk-local"
PATH_KEYS = ("task.data_path", "task.cache_dir")


# -- the declared run config ----------------------------------------------------
def compose_config(overrides=()) -> DictConfig:
    """The launcher's config for these Hydra overrides (no run directory)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def app_config_defaults() -> dict:
    """The flat ``[tool.flwr.app.config]`` defaults: the default config under
    runtime=flower, then every key that only other choices of a config group
    (task, sparsifier, aggregate, runtime, tracker, ...) or experiment presets
    have (with the first such choice's value, :func:`app_config_values`),
    then ``output_dir`` and the carrier of undeclared keys
    (settings.EXTRA_KEY)."""
    flat = {key: values[0] for key, values in app_config_values().items()}
    flat["output_dir"] = ""
    flat[EXTRA_KEY] = ""
    return flat


def app_config_values() -> dict:
    """``{key: [values]}``: each run-config key's value in the default config
    under runtime=flower, then in every choice of a config group and every
    experiment preset that has the key, in that order (groups and files
    sorted by name)."""
    out: dict = {}
    for key, value in to_run_config(compose_config(["runtime=flower"])).items():
        out.setdefault(key, []).append(value)
    groups = [g for g in config_groups() if g != "experiment"] + ["experiment"]
    for group in groups:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            for key, value in to_run_config(compose_config([f"{group}={path.stem}"])).items():
                out.setdefault(key, []).append(value)
    return out


def toml_value(value) -> str:
    """One TOML value as `flwr run --run-config` and pyproject.toml take it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    text = str(value)
    if '"' not in text and "\\" not in text:
        return json.dumps(text)  # basic string
    if "'" not in text and "\n" not in text:
        return f"'{text}'"  # literal string
    raise ValueError(f"{value!r}: a run-config string may not hold both ' and \" (or \\)")


def render_app_config(flat: dict) -> str:
    """``[tool.flwr.app.config]`` as nested TOML tables (dotted keys)."""
    top = {k: v for k, v in flat.items() if "." not in k}
    groups: dict = {}
    for key, value in flat.items():
        if "." in key:
            head, rest = key.split(".", 1)
            groups.setdefault(head, {})[rest] = value
    lines = ["[tool.flwr.app.config]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for head, items in groups.items():
        lines += ["", f"[tool.flwr.app.config.{head}]"]
        lines += [f"{k if k.isidentifier() else json.dumps(k)} = {toml_value(v)}"
                  for k, v in items.items()]
    return "\n".join(lines) + "\n"


def write_pyproject_app_config(pyproject: Path | None = None) -> bool:
    """Rewrite the ``[tool.flwr.app.config]`` tables of pyproject.toml from
    conf/ (everything from that header up to the next non-config table).
    Returns True when the file changed."""
    path = Path(pyproject) if pyproject else PROJECT_ROOT / "pyproject.toml"
    lines = path.read_text().splitlines(keepends=True)
    head = "[tool.flwr.app.config]"
    start = next(i for i, ln in enumerate(lines) if ln.strip() == head)
    end = start + 1
    while end < len(lines) and not (lines[end].startswith("[") and not
                                    lines[end].startswith("[tool.flwr.app.config")):
        end += 1
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1  # keep blank lines / comments that belong to the next table
    new = lines[:start] + [render_app_config(app_config_defaults())] + lines[end:]
    text = "".join(new)
    changed = text != "".join(lines)
    if changed:
        path.write_text(text)
    return changed


def pyproject_app_config(pyproject: Path | None = None) -> dict | None:
    """The flat defaults declared in pyproject.toml (None: no such file/table)."""
    from flwr.common.config import flatten_dict

    import tomllib
    path = Path(pyproject) if pyproject else PROJECT_ROOT / "pyproject.toml"
    if not path.exists():
        return None
    data = tomllib.loads(path.read_text())
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    return None if table is None else flatten_dict(table)


# -- a resolved config -> flwr run ------------------------------------------------
def deploy_run_config(cfg: DictConfig, output_dir=None) -> dict:
    """The flat run config for ``cfg`` under the Deployment Runtime: the
    runtime group becomes ``flower`` (its keys: round timeout, node wait, poll
    interval) when it is not already, relative data paths become absolute
    (paths on the submitting machine; a SuperNode overrides them with its
    ``--node-config data-path=...``), plus ``output_dir`` (a path on the
    SuperLink machine; relative = to the SuperLink's working directory)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if OmegaConf.select(cfg, "runtime.name") != "flower":
        cfg.runtime = OmegaConf.load(CONF_DIR / "runtime" / "flower.yaml")
    validate(cfg)
    flat = to_run_config(cfg)
    for key in PATH_KEYS:
        if flat.get(key):
            flat[key] = os.path.normpath(str(resolve_path(flat[key])))
    out = output_dir if output_dir is not None else OmegaConf.select(cfg, "output_dir")
    flat["output_dir"] = "" if out is None else str(out)
    return flat


def _same(a, b) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a)
                                               and math.isnan(b)))


def flwr_run_command(cfg: DictConfig, connection: str = DEFAULT_CONNECTION, *,
                     app: str = ".", output_dir=None, only_changed: bool = True,
                     stream: bool = False) -> str:
    """The ``flwr run`` command that runs ``cfg`` on the SuperLink named
    ``connection`` in ``$FLWR_HOME/config.toml``. With ``only_changed`` (the
    default) only keys whose value differs from the pyproject.toml defaults
    are passed (Flower fuses them over the defaults, so the apps see the same
    settings); else every key. Run it from the project root (``app``).

    A key pyproject.toml does not declare, which the chosen option of a
    config group has in its yaml (a sparsifier added with a key of its own),
    travels in the one declared key ``extra_keys`` (JSON; the apps unpack it:
    settings.from_run_config), so a new option needs no regenerated table.
    Any other undeclared key is refused."""
    flat = deploy_run_config(cfg, output_dir)
    declared = pyproject_app_config(Path(app) / "pyproject.toml" if app != "." else None)
    if declared is not None:
        unknown = sorted(set(flat) - set(declared))
        carried = {k: flat.pop(k) for k in unknown
                   if EXTRA_KEY in declared and _option_key(flat, k)}
        unknown = [k for k in unknown if k not in carried]
        if unknown:
            raise ValueError(f"run-config keys not declared in [tool.flwr.app.config]: "
                             f"{', '.join(unknown)} (python -m regtopk_fl.deploy pyproject)")
        if only_changed:
            flat = {k: v for k, v in flat.items() if not _same(v, declared[k])}
        if carried:
            flat[EXTRA_KEY] = json.dumps(carried, sort_keys=True)
    parts = ["flwr", "run", shlex.quote(app), shlex.quote(connection)]
    if flat:
        pairs = " ".join(f"{k}={toml_value(v)}" for k, v in flat.items())
        parts += ["--run-config", shlex.quote(pairs)]
    if stream:
        parts.append("--stream")
    return " ".join(parts)


def _option_key(flat: dict, key: str) -> bool:
    """Whether ``key`` ("sparsifier.sample_fraction") is a key of the chosen
    option's yaml (conf/sparsifier/<flat["sparsifier.name"]>.yaml)."""
    group, _, rest = key.partition(".")
    if not rest or "." in rest or not (CONF_DIR / group).is_dir():
        return False
    return rest in group_option_keys(group).get(flat.get(f"{group}.name"), set())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m regtopk_fl.deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pyproject", help="print the [tool.flwr.app.config] table")
    pp.add_argument("--write", action="store_true", help="rewrite it in pyproject.toml")
    cmd = sub.add_parser("command", help="print the flwr run command for Hydra overrides")
    cmd.add_argument("overrides", nargs="*")
    cmd.add_argument("--connection", default=DEFAULT_CONNECTION)
    cmd.add_argument("--output-dir", default=None)
    cmd.add_argument("--all", action="store_true", help="pass every key, not only changed ones")
    args = ap.parse_args(argv)
    if args.cmd == "pyproject":
        if args.write:
            print("pyproject.toml " + ("updated" if write_pyproject_app_config() else
                                       "already up to date"))
        else:
            sys.stdout.write(render_app_config(app_config_defaults()))
    else:
        print(flwr_run_command(compose_config(args.overrides), args.connection,
                               output_dir=args.output_dir, only_changed=not args.all))


if __name__ == "__main__":
    main()
