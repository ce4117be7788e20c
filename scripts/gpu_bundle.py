"""``make gpu-bundle``: what scripts/gpu_checks.sh needs on a lent GPU machine
that has Python 3.12, torch and the common scientific stack, but neither
Flower nor Ray nor Hydra, and no internet; what travels there is limited to
64 MiB. Everything goes under ``.gpu/`` (git-ignored; carry it):

* ``flower-cp312.tar.xz``: the cp312 manylinux wheels of flwr[simulation]
  (and Ray, which it pins), hydra-core, omegaconf, flwr-datasets and
  datasets at this project's versions, with their dependencies, installed
  into one folder (``pip install --target``, no dependency resolution on the
  machine) and packed with xz. Left out: distributions the machine already
  has (``DEVICE_HAS``: numpy, pandas, pyarrow, aiohttp, ...; except
  ``ALWAYS``, small ones flwr pins narrowly and protobuf/grpcio, whose
  versions flwr's generated code checks at import), the
  distributions nothing imports when the checks run (``gpu_bundle_imports.txt``:
  e.g. uv), Ray's Java jars and the Ray libraries the Flower simulation never
  imports (rllib, serve, tune, train, data, llm, air, workflow, the
  dashboard's web client; flwr's Ray backend imports only ``ray``,
  ``ray.util.actor_pool`` and ``ray.util.scheduling_strategies``), bytecode
  caches and test folders;
* ``cifar10-small.tar.gz``: the first 1000 training and 200 test images of
  each class of the offline archive, same layout (scripts/gpu_data.py).

The check (also run by the build, or alone with ``verify``): every module
that the GPU checks' processes imported when run here on the CPU (the
driver, Ray's workers and agents; recorded by ``trace`` into
``scripts/gpu_bundle_imports.txt``) resolves to the standard library, this
repository, a file in the bundle, or a distribution the machine has.
``--python312 PATH`` (a Python 3.12 with numpy/pandas/pyarrow/grpcio/
protobuf/... installed, e.g. a scratch venv) also unpacks the bundle and
starts Ray and a Flower simulation from it.

    python scripts/gpu_bundle.py [--out .gpu]          # build + check
    python scripts/gpu_bundle.py verify [--out .gpu]   # check an existing bundle
    python scripts/gpu_bundle.py trace                 # re-record the imports (~4 min)
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    """A distribution name as PyPI compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


IMPORTS = ROOT / "scripts" / "gpu_bundle_imports.txt"
BUNDLE = "flower-cp312.tar.xz"
DATA = "cifar10-small.tar.gz"
OFFLINE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# what the bundle is built from, at this project's (the CPU suite's) versions
TOPS = ("flwr[simulation]", "hydra-core", "omegaconf", "flwr-datasets", "datasets")
SDIST_ONLY = ("antlr4-python3-runtime",)  # pure Python, no wheel on PyPI: built here
# the lent machine's Python packages (/work/.library/device/KINDS.md, "Python
# packages already there", read 2026-11-17) that the bundle may rely on
DEVICE_HAS = frozenset(_norm(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama
contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x
cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader
lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
# ... but these travel anyway, at the versions the CPU suite runs: flwr pins
# them within narrow ranges the machine's unknown versions may miss (small, pure
# Python), or flwr's generated code refuses older ones at import (protobuf >= 5.29,
# grpcio >= 1.70): our processes import none of them through anything else
ALWAYS = frozenset({"typer", "rich", "click", "packaging", "shellingham", "markdown-it-py",
                    "mdurl", "pygments", "typing-extensions", "annotated-doc", "protobuf",
                    "grpcio"})
# the Ray libraries and files the Flower simulation never loads
RAY_STRIP = ("jars", "rllib", "serve", "tune", "train", "data", "llm", "air", "workflow",
             "dashboard/client", "util/dask", "util/spark", "util/joblib", "util/multiprocessing",
             "util/collective", "util/horovod", "util/xgboost", "util/lightgbm", "cpp",
             "includes", "autoscaler/aws", "autoscaler/gcp", "autoscaler/azure",
             "autoscaler/_private/aws", "autoscaler/_private/gcp",
             "autoscaler/_private/_azure", "autoscaler/_private/kuberay",
             "autoscaler/kuberay", "core/src/ray/raylet/raylet.debug")
PLATFORMS = (["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
             + [f"manylinux_2_{n}_x86_64" for n in range(5, 40)])
# import name -> distribution, where they differ (for the check)
MODULE_DIST = {"yaml": "pyyaml", "google": "protobuf", "grpc": "grpcio", "PIL": "pillow",
               "dateutil": "python-dateutil", "attr": "attrs", "attrs": "attrs",
               "jwt": "pyjwt", "pkg_resources": "setuptools", "_distutils_hack": "setuptools",
               "markdown_it": "markdown-it-py", "typing_extensions": "typing-extensions",
               "huggingface_hub": "huggingface-hub", "charset_normalizer": "charset-normalizer",
               "prometheus_client": "prometheus-client", "multipart": "python-multipart",
               "absl": "absl-py", "hf_xet": "hf-xet", "annotated_doc": "annotated-doc",
               "mpl_toolkits": "matplotlib", "pytz": "pytz", "tzdata": "tzdata",
               "_yaml": "pyyaml", "psutil": "psutil", "torchvision": "torchvision",
               "torch": "torch", "functorch": "torch", "torchgen": "torch", "triton": "torch",
               "_cffi_backend": "cffi", "google_crc32c": "google-crc32c",
               "sortedcontainers": "sortedcontainers", "pyarrow": "pyarrow"}


def _sh(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def _pins() -> list:
    """The top distributions at the versions installed here (the CPU suite's)."""
    out = []
    for spec in TOPS:
        name = spec.split("[")[0]
        out.append(f"{spec}=={md.version(name)}")
    return out


def _platform_args() -> list:
    args = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--abi", "cp312"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def download(wheels: Path) -> list:
    """The cp312 wheels of the closure of TOPS (plus the sdist-only ones,
    built here as pure-Python wheels)."""
    wheels.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    for name in SDIST_ONLY:
        if not list(wheels.glob(f"{name.replace('-', '_')}-*.whl")):
            _sh([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels,
                 f"{name}=={md.version(name)}"])
    _sh([py, "-m", "pip", "download", "-q", "-d", wheels, "--find-links", wheels,
         *_platform_args(), *_pins()])
    return sorted(wheels.glob("*.whl"))


def _wheel_dist(whl: Path) -> str:
    return _norm(whl.name.split("-")[0])


def traced_modules() -> set:
    if not IMPORTS.exists():
        raise SystemExit(f"{IMPORTS} is missing: python scripts/gpu_bundle.py trace")
    return {ln.strip() for ln in IMPORTS.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}


def _top_modules_of_wheel(whl: Path) -> set:
    """Top-level import names a wheel installs (from its file list)."""
    import zipfile

    tops = set()
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            first = n.split("/")[0]
            if first.endswith(".dist-info") or first.endswith(".data"):
                if "/purelib/" in n or "/platlib/" in n:
                    first = n.split("/")[2]
                else:
                    continue
            tops.add(first[:-3] if first.endswith(".py") else first.split(".")[0])
    return tops


def choose(wheels: list, imported_tops: set) -> tuple:
    """(wheels to install, {dist: why left out})."""
    keep, left = [], {}
    for whl in wheels:
        dist = _wheel_dist(whl)
        tops = _top_modules_of_wheel(whl)
        if dist in DEVICE_HAS and dist not in ALWAYS:
            left[dist] = "the machine has it"
        elif not tops & imported_tops and dist not in ALWAYS:
            left[dist] = f"nothing imports {sorted(tops)[:3]}"
        else:
            keep.append(whl)
    return keep, left


def strip(site: Path) -> int:
    """Remove Ray's unused libraries, caches and tests; bytes removed."""
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() \
            else (p.stat().st_size if p.exists() else 0)

    gone = 0
    for rel in RAY_STRIP:
        p = site / "ray" / rel
        if p.exists():
            gone += size(p)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in list(site.rglob("__pycache__")) + [d for d in site.rglob("tests") if d.is_dir()
                                                  and (d.parent / "__init__.py").exists()]:
        if p.exists():
            gone += size(p)
            shutil.rmtree(p)
    return gone


def build(out: Path, keep_wheels: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    wheels_dir = out / "wheels"
    imported = traced_modules()
    imported_tops = {m.split(".")[0] for m in imported}
    wheels = download(wheels_dir)
    keep, left = choose(wheels, imported_tops)
    site = out / "site"
    shutil.rmtree(site, ignore_errors=True)
    _sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
         "--no-index", "--target", site, *_platform_args(), *keep])
    for extra in ("bin",):  # console scripts of the target install: not used there
        shutil.rmtree(site / extra, ignore_errors=True)
    stripped = strip(site)
    unpacked = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    bundle = out / BUNDLE
    t0 = time.perf_counter()
    env = dict(os.environ, XZ_OPT="-9 -T0")
    _sh(["tar", "-C", site, "-cJf", bundle, "--sort=name", "--owner=0", "--group=0",
         "--numeric-owner", "."], env=env)
    info = {"wheels": [w.name for w in keep], "left_out": left,
            "closure": sorted({_wheel_dist(w) for w in wheels}),
            "stripped_mib": round(stripped / 2**20, 1), "unpacked_mib": round(unpacked / 2**20, 1),
            "bundle_mib": round(bundle.stat().st_size / 2**20, 2),
            "xz_s": round(time.perf_counter() - t0, 1)}
    shutil.rmtree(site, ignore_errors=True)  # .gpu/ then holds what travels (and bundle.json)
    if not keep_wheels:
        shutil.rmtree(wheels_dir, ignore_errors=True)
    return info


def data(out: Path) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_data import reduce

    dst = out / DATA
    counts = reduce(OFFLINE, dst, 1000, 200)
    return {"data": str(dst), "images": counts, "data_mib": round(dst.stat().st_size / 2**20, 2)}


# -- the check ----------------------------------------------------------------------------
def _device_modules() -> dict:
    """Top-level import name -> distribution, for the machine's distributions
    that are installed here too (plus MODULE_DIST)."""
    out = {m: d for m, d in MODULE_DIST.items() if _norm(d) in DEVICE_HAS}
    for mod, dists in md.packages_distributions().items():
        for d in dists:
            if _norm(d) in DEVICE_HAS:
                out.setdefault(mod, _norm(d))
    for d in DEVICE_HAS:
        out.setdefault(d.replace("-", "_"), d)
    return out


def _own_modules() -> set:
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    return tops | {p.stem for p in (ROOT / "scripts").glob("*.py")} | {"conftest", "_report"}


def _exists(base: Path, mod: str) -> bool:
    """Whether module ``mod`` (dotted) is a file or package under ``base``:
    a .py, a package folder, or a C extension (.so); or, for ``a.b`` with no
    file of its own, a name package ``a`` sets up (its folder is there)."""
    rel = Path(*mod.split("."))
    if (base / rel).is_dir() or (base / f"{rel}.py").exists() or \
            list((base / rel.parent).glob(f"{rel.name}.*so")) or \
            (base / rel.parent / f"{rel.name}.so").exists():
        return True
    return False


def _here(mod: str):
    """The site folder the module's top-level package is installed in here (None: not here)."""
    import importlib.util

    top = mod.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin is None and spec.submodule_search_locations:  # a namespace package
        return Path(list(spec.submodule_search_locations)[0]).parent
    if spec.origin in (None, "built-in", "frozen"):
        return Path("/")
    loc = Path(spec.origin)
    return loc.parent.parent if loc.name == "__init__.py" else loc.parent


def _dist_here(top: str):
    """The distribution that provides import name ``top`` here (None: none)."""
    dists = md.packages_distributions().get(top)
    return _norm(dists[0]) if dists else None


def check(site: Path, closure=None) -> dict:
    """Every traced module -> where it comes from on the machine: the
    standard library, this repository, the bundle, or the machine's own
    packages. A traced module that is not installed here either was an
    optional import that failed here too ("optional")."""
    imported = traced_modules()
    in_bundle = {p.name.split(".")[0] for p in site.iterdir()
                 if not p.name.endswith((".dist-info", ".data"))}
    in_bundle = {n[:-3] if n.endswith(".py") else n for n in in_bundle}
    device, own = _device_modules(), _own_modules()
    std = set(sys.stdlib_module_names) | {"__main__", "sitecustomize", "usercustomize"}
    where, missing, optional = {}, [], []
    for mod in sorted(imported):
        top = mod.split(".")[0]
        if top in std:
            continue
        here = _here(mod)
        exists_here = here is not None and (here == Path("/") or "." not in mod
                                            or _exists(here, mod))
        if top in own:
            where.setdefault("repository", set()).add(top)
        elif top in in_bundle:
            if "." in mod and not _exists(site, mod):
                if exists_here:
                    missing.append(f"{mod} (stripped from the bundle)")
                else:
                    optional.append(mod)
                continue
            where.setdefault("bundle", set()).add(top)
        elif top in device:
            where.setdefault("machine", set()).add(f"{top} ({device[top]})")
        elif not exists_here:
            optional.append(mod)
        elif closure is not None and _dist_here(top) not in closure:
            # installed here for another package; not in the dependencies of what
            # the bundle is made of, so absent from a plain install too (e.g. Ray's
            # opentelemetry, which only its [default] extra brings)
            optional.append(f"{mod} (not a dependency: {_dist_here(top)})")
        else:
            missing.append(mod)
    return {"missing": sorted(set(missing)), "optional": sorted(set(optional)),
            **{k: sorted(v) for k, v in where.items()}, "traced": len(imported)}


def verify(out: Path, python312: str | None, closure=None) -> dict:
    bundle = out / BUNDLE
    if closure is None and (out / "bundle.json").exists():
        closure = json.loads((out / "bundle.json").read_text()).get("closure")
    with tempfile.TemporaryDirectory(prefix="regtopk-bundle-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        _sh(["tar", "-xJf", bundle, "-C", site])
        res = check(site, None if closure is None else set(closure))
        res["top_level"] = sorted(p.name for p in site.iterdir()
                                  if not p.name.endswith(".dist-info"))
        res["dists"] = sorted(p.name[:-len(".dist-info")] for p in site.iterdir()
                              if p.name.endswith(".dist-info"))
        if python312:
            res["python312"] = run_on_312(python312, site)
    return res


def py312_env(path: Path, python: str, out: Path) -> str:
    """A scratch Python 3.12 venv standing in for the GPU machine without
    torch: the distributions the bundle leaves out because the machine has
    them, at this project's versions. Returns its python for ``--python312``."""
    info = json.loads((out / "bundle.json").read_text())
    want = [d for d, why in info["left_out"].items() if why == "the machine has it"]
    _sh([python, "-m", "venv", path])
    py = path / "bin" / "python"
    pins = []
    for d in want:
        try:
            pins.append(f"{d}=={md.version(d)}")
        except md.PackageNotFoundError:
            pins.append(d)
    _sh([py, "-m", "pip", "install", "-q", "--only-binary=:all:", *pins])
    return str(py)


PROBE_312 = r"""
import sys, os, time
t0 = time.time()
import flwr, ray, hydra, omegaconf, flwr_datasets, datasets
from flwr.simulation import run_simulation
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.app import ArrayRecord, Context
from flwr_datasets.partitioner import IidPartitioner, SizePartitioner, DirichletPartitioner
import numpy as np
print("python", sys.version.split()[0], "flwr", flwr.__version__, "ray", ray.__version__,
      "hydra", hydra.__version__, "datasets", datasets.__version__, flush=True)
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
@ray.remote
def sq(x):
    return x * x
print("ray task:", ray.get(sq.remote(7)), flush=True)
ray.shutdown()
client = ClientApp()
@client.query("ping")
def ping(msg, context):
    from flwr.app import Message, RecordDict, MetricRecord
    return Message(RecordDict({"m": MetricRecord({"pid": os.getpid()})}), reply_to=msg)
server = ServerApp()
got = []
@server.main()
def main(grid, context):
    from flwr.app import Message, MessageType, RecordDict
    nodes = list(grid.get_node_ids())
    while len(nodes) < 2:
        time.sleep(0.2); nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY + ".ping")
            for n in nodes]
    got.extend(grid.send_and_receive(msgs, timeout=120))
run_simulation(server_app=server, client_app=client, num_supernodes=2,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                               "init_args": {"include_dashboard": False}})
print("flower simulation replies:", len([m for m in got if not m.has_error()]),
      "in", round(time.time() - t0, 1), "s", flush=True)
assert len([m for m in got if not m.has_error()]) == 2
"""


def run_on_312(python: str, site: Path) -> str:
    """Import the bundle and run Ray and a two-node Flower simulation with a
    Python 3.12 (no torch needed)."""
    env = dict(os.environ, PYTHONPATH=str(site), FLWR_TELEMETRY_ENABLED="0",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run([python, "-c", PROBE_312], env=env, capture_output=True, text=True,
                         timeout=600)
    text = (out.stdout + out.stderr).strip()
    print(text[-3000:])
    if out.returncode != 0:
        raise SystemExit(f"the bundle failed on {python} (rc {out.returncode})")
    return out.stdout.strip().splitlines()[-1]


# -- trace --------------------------------------------------------------------------------------
SITECUSTOMIZE = r'''
import os, sys
_d = os.environ.get("REGTOPK_IMPORT_TRACE")
if _d:
    class _Recorder:
        """First on sys.meta_path: sees every module this process looks for
        (import statements, importlib.import_module, failed optional imports)."""

        def __init__(self):
            self.seen = set()
            self.f = open(os.path.join(_d, f"{os.getpid()}.txt"), "a", buffering=1)

        def find_spec(self, name, path=None, target=None):
            if name not in self.seen:
                self.seen.add(name)
                self.f.write(name + "\n")
            return None

    sys.meta_path.insert(0, _Recorder())
'''


def trace() -> None:
    """Run the GPU checks' steps on the CPU (tiny settings) with every Python
    process recording the modules it imports; write IMPORTS."""
    with tempfile.TemporaryDirectory(prefix="regtopk-trace-") as tmp:
        tmp = Path(tmp)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (tmp / "log").mkdir()
        _sh([sys.executable, ROOT / "scripts" / "gpu_data.py", "synthetic", tmp / "d.tar.gz",
             "--train", "40", "--test", "10"])
        env = dict(os.environ, REGTOPK_IMPORT_TRACE=str(tmp / "log"),
                   PYTHONPATH=os.pathsep.join([str(tmp / "site"), str(ROOT)]))
        small = ["--device", "cpu", "--rounds", "2", "--width", "4", "--workers", "2",
                 "--sparsifiers", "regtopk", "--reps", "1", "--many-n", "4", "--many-m", "2",
                 "--many-width", "4", "--many-rounds", "2", "--test-subset", "20",
                 "--data", str(tmp / "d.tar.gz"), "--cache", str(tmp / "cache"),
                 "--out", str(tmp / "out"), "--runs", str(tmp / "runs")]
        for step in ("env", "inprocess", "flower", "many"):
            _sh([sys.executable, ROOT / "scripts" / "gpu_bench.py", step, *small], env=env)
        res = json.loads((tmp / "out" / "gpu_summary.json").read_text())
        bad = [k for k, v in res.items() if "error" in v]
        if bad:
            raise SystemExit(f"trace: steps failed: {bad}")
        mods, procs = set(), 0
        for f in (tmp / "log").glob("*.txt"):
            procs += 1
            mods |= {ln.strip() for ln in f.read_text().splitlines() if ln.strip()}
    std = set(sys.stdlib_module_names)
    keep = sorted(m for m in mods if m.split(".")[0] not in std and not m.startswith("_")
                  or m.split(".")[0] in ("_cffi_backend", "_yaml", "_pytest"))
    IMPORTS.write_text(
        "# Modules (outside the standard library) imported by the GPU checks' Python\n"
        "# processes, run on the CPU with tiny settings: `python scripts/gpu_bundle.py trace`\n"
        f"# ({procs} processes: the driver, Ray's workers and agents; "
        f"{time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]})\n"
        + "\n".join(keep) + "\n")
    print(f"{IMPORTS}: {len(keep)} modules from {procs} processes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", default="build",
                    choices=("build", "verify", "trace", "py312-env"))
    ap.add_argument("path", nargs="?", type=Path, help="py312-env: the venv to make")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu")
    ap.add_argument("--keep-wheels", action="store_true")
    ap.add_argument("--python312", default=os.environ.get("REGTOPK_PYTHON312"),
                    help="a Python 3.12 with the machine's common packages: run the bundle there")
    args = ap.parse_args(argv)
    if args.cmd == "trace":
        trace()
        return 0
    if args.cmd == "py312-env":
        print(py312_env(args.path, args.python312 or "python3.12", args.out))
        return 0
    info = {}
    if args.cmd == "build":
        info.update(build(args.out, args.keep_wheels))
        info.update(data(args.out))
    if args.cmd == "verify" and (args.out / "bundle.json").exists():
        info = {k: v for k, v in json.loads((args.out / "bundle.json").read_text()).items()
                if k in ("wheels", "left_out", "closure", "stripped_mib", "unpacked_mib",
                         "bundle_mib", "xz_s", "data", "images", "data_mib")}
    res = verify(args.out, args.python312, info.get("closure"))
    info.update(res)
    (args.out / "bundle.json").write_text(json.dumps(info, indent=1))
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             text=True).stdout.split("\0")
    repo = sum((ROOT / p).stat().st_size for p in tracked if p and (ROOT / p).is_file())
    sizes = {f.name: round(f.stat().st_size / 2**20, 2) for f in args.out.glob("*")
             if f.is_file() and f.name != "bundle.json"}
    print(json.dumps({k: v for k, v in info.items() if k not in ("wheels",)}, indent=1))
    print(f"sizes (MiB): {sizes}; the repository's tracked files: {repo / 2**20:.2f}; "
          f"together {(sum(sizes.values()) + repo / 2**20):.1f} (limit 64)")
    if res["missing"]:
        print(f"NOT RESOLVED on the GPU machine: {res['missing']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
