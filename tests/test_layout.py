"""The layout's rules, checked on the code:

* the core package stands alone: importing every module of regtopk_fl pulls
  in neither the Flower apps (strategies/, clients/) nor Flower itself; the
  runtime is chosen by the config's ``_target_``;
* the two Flower apps never import each other: each depends on the wire
  protocol (protocol/) and the core, as in Flower's ``flwr new`` template,
  and only simulation/ builds both;
* no import cycle among regtopk_fl's modules, counting imports inside
  functions too (a lazy import that hides a cycle is still a cycle).
"""
import ast
import subprocess
import sys

from regtopk_fl.paths import CONF_DIR, PROJECT_ROOT

PROBE = """
import importlib, pkgutil, sys
import regtopk_fl
for m in pkgutil.walk_packages(regtopk_fl.__path__, "regtopk_fl."):
    if m.name.endswith("__main__"):  # that one runs the launcher
        continue
    importlib.import_module(m.name)
bad = sorted(n for n in sys.modules if n.split(".")[0] in ("strategies", "clients", "flwr"))
print(",".join(bad))
"""


def _modules(package: str) -> dict:
    """{dotted module name: parsed AST} of one top-level package."""
    out = {}
    for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
        parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (ast.parse(path.read_text()), path.name == "__init__.py")
    return out


def _imports(name: str, tree, is_pkg: bool) -> set:
    """Every module name an import statement anywhere in ``tree`` names."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return out


def test_core_package_imports_no_flower_app():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", out.stdout


def test_flower_apps_never_import_each_other():
    forbidden = {"clients": {"strategies", "simulation"}, "strategies": {"clients", "simulation"},
                 "protocol": {"clients", "strategies", "simulation"},
                 "regtopk_fl": {"clients", "strategies", "protocol", "simulation"}}
    seen = set()
    for package, banned in forbidden.items():
        for name, (tree, is_pkg) in _modules(package).items():
            tops = {m.split(".")[0] for m in _imports(name, tree, is_pkg)}
            assert not tops & banned, (name, sorted(tops & banned))
            seen.add(package)
    assert seen == set(forbidden)
    # the rule can fail: simulation/ is the place that imports both apps
    sim = _modules("simulation")
    tops = set().union(*({m.split(".")[0] for m in _imports(n, t, p)} for n, (t, p) in sim.items()))
    assert {"clients", "strategies"} <= tops


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_core():
    mods = _modules("regtopk_fl")
    graph = {n: _imports(n, t, p) & set(mods) for n, (t, p) in mods.items()}
    assert len(graph) > 30 and sum(map(len, graph.values())) > 30  # the scan sees imports
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # and finds one


def test_runtimes_are_named_by_target():
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    for name in ("inprocess", "flower"):
        target = OmegaConf.load(CONF_DIR / "runtime" / f"{name}.yaml")["_target_"]
        assert callable(get_method(target)), target
