"""The checks that keep the Markdown true (`make test` runs them through
tests/test_docs.py; run them alone with `python scripts/check_docs.py`).

1. links:    every relative link and #anchor of every Markdown file resolves
             (the file or folder exists; the anchor is one of the target's
             headings under GitHub's slug rule, or an explicit <a id=...>).
2. commands: every `regtopk-fl ...` line in a code block of README.md and
             docs/ composes with Hydra and passes regtopk_fl.settings.validate,
             without running anything.
3. numbers:  every number in the results index (results/README.md) appears in
             the page that its table row or paragraph links to.

Each check returns a list of problems, one line each ("file:line: what").
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# folders that hold no documentation of ours: run outputs, environments, caches
SKIP_DIRS = {"results/sweeps", "results/runs", "results/cache", "node_modules", "__pycache__"}

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
ANCHOR_TAG = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def markdown_files(root: Path = ROOT) -> list:
    """Every .md file under root, without hidden folders and run outputs."""
    out = []
    for d, dirs, files in os.walk(root):
        rel = Path(d).relative_to(root).as_posix()
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and not x.endswith(".egg-info")
                         and (f"{rel}/{x}" if rel != "." else x) not in SKIP_DIRS
                         and x not in SKIP_DIRS)
        out += [Path(d) / f for f in sorted(files) if f.endswith(".md")]
    return out


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield no, line


def code_lines(text: str):
    """(line number, line) of the lines inside fenced code blocks."""
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            yield no, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower-cased, without
    punctuation (letters, digits, '-', '_' and spaces stay), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    keep = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_ " or cat[0] in "LM" or cat in ("Nd", "Nl"):
            keep.append(ch)
    return "".join(keep).replace(" ", "-")


def anchors(text: str) -> set:
    """The anchors a Markdown file offers: its headings' slugs (repeats get
    -1, -2, ... as on GitHub) and explicit <a id=...> / <a name=...>."""
    seen: dict = {}
    out = set()
    for _, line in prose_lines(text):
        m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(ANCHOR_TAG.findall(line))
    return out


def links(text: str):
    """(line number, target) of every Markdown link outside code."""
    for no, line in prose_lines(text):
        bare = CODE_SPAN.sub(lambda m: "`" + "x" * len(m.group(2)) + "`"
                             if "](" not in m.group(2) else "", line)
        # a code span inside a link's text ([`x`](y)) is kept as placeholder text
        for m in LINK.finditer(bare):
            yield no, m.group(1)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def check_links(root: Path = ROOT, files=None) -> list:
    """Every relative link resolves: the path exists, and a #anchor into a
    Markdown file (or the file itself) is one of its anchors."""
    root = Path(root)
    problems = []
    cache: dict = {}

    def anchors_of(p: Path) -> set:
        if p not in cache:
            cache[p] = anchors(p.read_text(encoding="utf-8"))
        return cache[p]

    for f in files if files is not None else markdown_files(root):
        text = f.read_text(encoding="utf-8")
        rel = f.relative_to(root).as_posix()
        for no, target in links(text):
            if is_external(target):
                continue
            path, _, anchor = target.partition("#")
            dest = f if not path else (f.parent / path)
            try:
                dest = dest.resolve()
            except OSError:
                problems.append(f"{rel}:{no}: {target}: cannot resolve")
                continue
            if not dest.exists():
                problems.append(f"{rel}:{no}: {target}: no such file or folder")
                continue
            if anchor and dest.is_file() and dest.suffix == ".md":
                if anchor not in anchors_of(dest):
                    problems.append(f"{rel}:{no}: {target}: no heading with anchor #{anchor} in "
                                    f"{dest.relative_to(root.resolve()).as_posix()}")
    return problems


# -- 2. commands ---------------------------------------------------------------

PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
MARK = "__PLACEHOLDER__"
SHELL_OPS = {";", "&&", "||", "|", "&", ">", ">>", "<", "(", ")", "2>", "2>&1"}
# keys whose value names a file or device of the machine that runs the command:
# the command is right if only these fail here (the archive, the weights, CUDA)
MACHINE_KEYS = ("task.data_path", "task.pretrained_weights", "task.init_from",
                "server.node_keys")


def doc_command_files(root: Path = ROOT) -> list:
    root = Path(root)
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def doc_commands(files):
    """(file, line number, text) of each `regtopk-fl ...` command in a code
    block, continuation lines joined."""
    for f in files:
        text = f.read_text(encoding="utf-8")
        pending, start = "", 0
        for no, line in code_lines(text):
            if not pending:
                start = no
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            whole, pending = pending + stripped, ""
            if re.search(r"(^|[\s/])regtopk-fl(\s|$)", whole):
                yield f, start, whole


def _split_top(value: str, sep: str = ",") -> list:
    """value split at top-level separators (not inside quotes or brackets)."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def first_value(value: str) -> str:
    """One job's value of a sweep value: a comma list's first item, range(a, b)'s
    a (range(n)'s 0), choice(x, ...)'s x; anything else as it is."""
    v = value.strip()
    m = re.fullmatch(r"range\((.*)\)", v)
    if m:
        args = _split_top(m.group(1))
        return args[0].strip() if len(args) > 1 else "0"
    m = re.fullmatch(r"choice\((.*)\)", v)
    if m:
        return _split_top(m.group(1))[0].strip()
    parts = _split_top(v)
    return parts[0] if len(parts) > 1 else v


def command_overrides(command: str, env=None):
    """The Hydra overrides of one `regtopk-fl` command as one job sees them, or
    (None, why) where the command cannot be checked as written. Hydra's own
    keys (hydra.*, hydra/launcher=...) are dropped: they choose where and how
    jobs run, not what a run is."""
    env = dict(env or {})
    for name in re.findall(r"\$\{?(\w+)\}?", command):
        env.setdefault(name, str(ROOT) if name == "PWD" else f"/tmp/{name.lower()}")
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], command)
    line = PLACEHOLDER.sub(MARK, line)  # <dir>, <sweep dir>: one word, not a redirection
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError as exc:
        return None, f"cannot be split as shell words ({exc})"
    idx = next((i for i, t in enumerate(tokens) if os.path.basename(t) == "regtopk-fl"), None)
    if idx is None:
        return None, "no regtopk-fl command"
    args = []
    for tok in tokens[idx + 1:]:
        if tok in SHELL_OPS:
            break
        args.append(tok)
    out = []
    for tok in args:
        if tok in ("-m", "--multirun"):
            continue
        if tok in ("...", "…"):  # "and more overrides": check the ones written
            continue
        if "..." in tok or "…" in tok:
            return None, f"placeholder {tok!r}"
        if tok.startswith("-"):
            return None, f"option {tok!r}"
        key, eq, value = tok.partition("=")
        if not eq:
            return None, f"not an override: {tok!r}"
        if key.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        if MARK in tok:
            return None, f"placeholder in {tok!r}"
        value = first_value(value)
        if re.search(r"\s", value) and value[:1] not in "'\"":
            value = "'" + value.replace("'", "\\'") + "'"
        out.append(f"{key}={value}")
    return out, ""


def check_command(overrides: list, conf_dir=None):
    """'' when the overrides compose and validate, else the one-line reason.
    A failure only of a file or device the machine lacks (MACHINE_KEYS,
    device=cuda without CUDA) is not the command's fault."""
    from hydra import compose, initialize_config_dir

    from regtopk_fl.settings import CONF_DIR, ConfigError, validate

    try:
        with initialize_config_dir(config_dir=str(conf_dir or CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as exc:  # noqa: BLE001 - Hydra's override and composition errors
        return f"Hydra: {str(exc).strip().splitlines()[0]}"
    try:
        validate(cfg)
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith(tuple(k + "=" for k in MACHINE_KEYS)) or (
                msg.startswith("device='cuda'") and "no CUDA device" in msg):
            return ""
        return msg
    return ""


def check_commands(root: Path = ROOT, files=None, conf_dir=None) -> tuple:
    """(problems, number of commands checked, skipped as [(where, why)])."""
    root = Path(root)
    problems, checked, skipped = [], 0, []
    for f, no, cmd in doc_commands(files if files is not None else doc_command_files(root)):
        where = f"{f.relative_to(root).as_posix()}:{no}"
        overrides, why = command_overrides(cmd)
        if overrides is None:
            skipped.append((where, why))
            continue
        checked += 1
        err = check_command(overrides, conf_dir)
        if err:
            problems.append(f"{where}: {' '.join(overrides)}: {err}")
    return problems, checked, skipped


# -- 3. numbers ----------------------------------------------------------------

NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:[eE][-−+]?\d+)?")


def _plain(text: str) -> str:
    text = text.replace("−", "-").replace("\u202f", " ").replace("\u00a0", " ")
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)


def numbers(text: str) -> list:
    """The numbers of a piece of prose: link targets, inline HTML and the
    digits inside words (fig3, h200, #17's 17 stays) left out."""
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"<[^>]*>", "", text)  # HTML comments and tags
    text = _plain(text)
    return [m.group(0).rstrip(",") for m in NUMBER.finditer(text)]


def appears(number: str, page_text: str) -> bool:
    pat = r"(?<![\d.])" + re.escape(number.replace("−", "-")) + r"(?!\d)"
    return re.search(pat, page_text) is not None


def index_units(text: str):
    """(line number, section, text) of the index's units: each table row, each
    list item and each paragraph, outside code blocks and headings; section is
    the heading above it."""
    unit, start, section = [], 0, ""
    for no, line in prose_lines(text):
        s = line.strip()
        new = (not s or s.startswith("|") or s.startswith("#") or re.match(r"^([-*]|\d+\.)\s", s))
        if new and unit:
            yield start, section, " ".join(unit)
            unit = []
        if s.startswith("#"):
            section = s.lstrip("#").strip()
            continue
        if not s or s.startswith("<!--"):
            continue
        if s.startswith("|"):
            if not re.fullmatch(r"\|[\s:|-]*\|?", s):  # not the separator row
                yield no, section, s
            continue
        if not unit:
            start = no
        unit.append(s)
    if unit:
        yield start, section, " ".join(unit)


def _linked_pages(unit: str, base: Path) -> list:
    pages = []
    for m in LINK.finditer(unit):
        path = m.group(1).partition("#")[0]
        if path and not is_external(m.group(1)):
            p = base / path
            if p.is_file() and p.suffix == ".md":
                pages.append(p)
    return pages


def check_index_numbers(index: Path = None) -> list:
    """Every number of a unit of the index appears in a Markdown page that the
    same unit links to. A unit that links no page (a note under a table) is
    held to the pages its section links; numbers with no page at all are a
    problem too."""
    index = Path(index or ROOT / "results" / "README.md")
    text = index.read_text(encoding="utf-8")
    units = list(index_units(text))
    by_section: dict = {}
    for _, section, unit in units:
        by_section.setdefault(section, []).extend(_linked_pages(unit, index.parent))
    problems = []
    for no, section, unit in units:
        nums = numbers(unit)
        if not nums:
            continue
        pages = _linked_pages(unit, index.parent) or by_section.get(section, [])
        if not pages:
            problems.append(f"{index.name}:{no}: numbers {nums} but no page linked beside them")
            continue
        pages = list(dict.fromkeys(pages))
        corpus = "\n".join(_plain(p.read_text(encoding="utf-8")) for p in pages)
        missing = [n for n in nums if not appears(_plain(n), corpus)]
        if missing:
            names = ", ".join(p.name for p in pages)
            problems.append(f"{index.name}:{no}: {missing} not in {names}")
    return problems


def main(argv=None) -> int:
    problems = check_links()
    cmd_problems, checked, skipped = check_commands()
    problems += cmd_problems + check_index_numbers()
    for p in problems:
        print(p)
    print(f"check_docs: {len(markdown_files())} Markdown files, {checked} regtopk-fl commands "
          f"checked ({len(skipped)} skipped: placeholders), {len(problems)} problem(s)",
          file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
