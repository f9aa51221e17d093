"""The docs name the code as it is: every file, class, method and function they mention exists, every snippet they
quote from a file is in that file, and every link lands. A doc that goes stale fails here, naming the doc, the line
and what is missing, so the commit that changes the code changes the doc with it.

The rules (the docs follow them; a new doc that names code should too):

Which docs. Code names, paths and quotes: README.md, docs/design.md, docs/walkthrough.md (NAMED_DOCS). Paths also
in docs/benchmarks.md, whose commands must run (PATH_DOCS; not docs/benchmarks-history.md, which keeps the paths of
its day). Links in every doc (docs/*.md, README.md).

What counts as a code name. Anything in single backticks, in the text of these docs or in their un-tagged fenced
blocks (diagrams, layouts), that reads as code:
- `Class.attr`, `module.attr`, `a.b.c`, optionally called (`Scheduler.schedule()`, `ops.rms_norm(...)`): dotted
  identifiers. The first part must be one of ours (a class defined in nanovllm/, a module of nanovllm/ named by
  any tail of its dotted path, such as `ops`, `llm_engine`, `nanovllm.inputs`, or `layers/parallel` written as a
  path), a variable the docs use for one of our classes (VARIABLES, e.g. `llm` for an `LLM`), or a name from
  outside the project listed in OUTSIDE. Each next part must be defined there: a module's top-level def, class
  or assignment (imports do not count); a class's method, class attribute, dataclass field, enum member or
  `self.x = ...` attribute (its bases' too). Past an instance attribute, whose type the AST does not tell, a part
  must be an attribute of some class of ours.
- `name()` / `name(...)` with no dot: a function, method or class defined in nanovllm/ (or listed in OUTSIDE).
- a lone `CamelCase` identifier: a class defined in nanovllm/, a Python builtin, or listed in OUTSIDE.
- a lone `snake_case` or `UPPER_CASE` identifier with an underscore (`max_num_batched_tokens`, `spec_token_ids`,
  `FINAL_ONLY`): an identifier somewhere in nanovllm/ (a name, attribute, argument, keyword or identifier-like
  string constant such as a JSON field).
- outside backticks too (prose and un-tagged fenced blocks): `CamelCase.attr` tokens, checked as above.
- Backtick spans with anything else in them (operators, spaces, literals, flags) are not names.

What counts as a path. A token ending in .py, .c, .h, .md, .sh or .toml, in backticks or not
(`engine/request.py`, docs/benchmarks.md, `kernels/cpu/*.c`): some file of the repository must end with it
(a glob must match at least one). A backticked token ending in `/` (`ops/`, `tests/gpu/`) is a directory that
must end some directory's path.

What counts as a quote. A fenced block whose info string names its source file: ```` ```python from PATH ````
(renderers read only the first word, the language). Its text must appear in PATH, whitespace and comments aside
(the doc may drop the source's comments and add its own), in order; `...` (on its own line or inside one) elides
source text. Every other ```python block is an example for the reader and must parse as Python. Inline
backticks are never quotes, only names.

The layout. design.md's `## Layout` fenced block is a tree (two spaces per level; an entry starts before column
24, its description after): every entry that names a file or directory must exist, and every module under
nanovllm/ and every script in benchmarks/ must be named, as an entry or in its directory entry's description
(`norm` or `norm.py`).

Links. `[text](target)` to a file of the repository must land on one (relative to the doc), and a `#anchor` on
one of the target's headings (GitHub's anchors). Nothing links outside the repository (no URLs), as the house
rules say.
"""

import ast
import builtins
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# the repository's root: the folder above this file that holds pyproject.toml (the tests may move into subfolders)
ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PACKAGE = ROOT / "nanovllm"
NAMED_DOCS = ["README.md", "docs/design.md", "docs/walkthrough.md"]
PATH_DOCS = [*NAMED_DOCS, "docs/benchmarks.md"]
LINKED_DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

# the docs' variables that stand for one of our classes, as in `llm = LLM()`
VARIABLES = {
    "llm": "LLM",
    "engine": "LLMEngine",
    "runner": "ModelRunner",
    "seq": "Sequence",
    "request": "Request",
    "batch": "ScheduledBatch",
}
# names from outside the project that the docs use (kept to those in use: a
# name of ours that is misspelt must not pass as someone else's)
OUTSIDE = {
    "torch",
    "tl",  # Triton's language module (`tl.dot`)
    "hmac",  # `hmac.compare_digest`
    "mma",  # PTX's `mma.sync`
    "stream_options",  # OpenAI's request fields
    "extra_body",
}
PATH_SUFFIXES = (".py", ".c", ".h", ".md", ".sh", ".toml")
SKIP_FILES = {"__init__.py"}  # a package's own module: named by its directory in the layout


# ---- what the package defines --------------------------------------------------------------------------------
@dataclass
class ClassInfo:
    attrs: set[str] = field(default_factory=set)  # methods, class-level names, fields, self.x
    bases: list[str] = field(default_factory=list)


@dataclass
class Index:
    modules: dict[str, set[str]]  # dotted module name -> its top-level names
    classes: dict[str, list[ClassInfo]]  # class name -> every class of that name
    functions: set[str]  # every def's name (functions and methods)
    identifiers: set[str]  # every identifier anywhere in the package
    files: list[str]  # every file of the repository, relative to its root
    dirs: list[str]


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, (ast.Tuple, ast.List)):
        return [t for elt in node.elts for t in _targets(elt)]
    return [node]


def _class_info(node: ast.ClassDef) -> ClassInfo:
    info = ClassInfo(bases=[b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases])
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            info.attrs.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            info.attrs.add(item.target.id)
        elif isinstance(item, ast.Assign):
            info.attrs |= {t.id for target in item.targets for t in _targets(target) if isinstance(t, ast.Name)}
    for sub in ast.walk(node):
        targets = []
        if isinstance(sub, ast.Assign):
            targets = [t for target in sub.targets for t in _targets(target)]
        elif isinstance(sub, (ast.AnnAssign, ast.AugAssign)):
            targets = [sub.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                info.attrs.add(t.attr)
        if isinstance(sub, ast.Call) and getattr(sub.func, "attr", None) == "__setattr__" and len(sub.args) >= 2:
            if isinstance(sub.args[1], ast.Constant) and isinstance(sub.args[1].value, str):
                info.attrs.add(sub.args[1].value)  # object.__setattr__(self, "name", ...) (a frozen dataclass)
    return info


def _build_index() -> Index:
    modules: dict[str, set[str]] = {}
    classes: dict[str, list[ClassInfo]] = {}
    functions: set[str] = set()
    identifiers: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        top = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                top.add(node.name)
            elif isinstance(node, ast.Assign):
                top |= {t.id for target in node.targets for t in _targets(target) if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                top.add(node.target.id)
        modules[name] = top
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(_class_info(node))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.add(node.name)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                identifiers.add(node.name)
            elif isinstance(node, ast.Name):
                identifiers.add(node.id)
            elif isinstance(node, ast.Attribute):
                identifiers.add(node.attr)
            elif isinstance(node, ast.arg):
                identifiers.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                identifiers.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                identifiers.add(node.value)
    files, dirs = [], []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or "__pycache__" in rel.parts or rel.parts[0].endswith(".egg-info"):
            continue
        (dirs if path.is_dir() else files).append(str(rel))
    return Index(modules, classes, functions, identifiers, sorted(files), sorted(dirs))


INDEX = _build_index()


# ---- resolving a name --------------------------------------------------------------------------------------
def _class_attrs(name: str) -> set[str]:
    """The attributes of every class of that name and of its bases in the package."""
    attrs, todo, seen = set(), [name], set()
    while todo:
        current = todo.pop()
        seen.add(current)
        for info in INDEX.classes.get(current, []):
            attrs |= info.attrs
            todo += [b for b in info.bases if b not in seen]
    return attrs


def _any_class_has(attr: str) -> bool:
    return any(attr in info.attrs for infos in INDEX.classes.values() for info in infos)


def _modules_named(parts: list[str]) -> list[str]:
    """Our modules whose dotted name ends with these parts (`ops` -> nanovllm.ops)."""
    tail = ".".join(parts)
    return [m for m in INDEX.modules if m == tail or m.endswith("." + tail)]


def _resolve_in_class(cls: str, rest: list[str]) -> str | None:
    if not rest:
        return None
    if rest[0] not in _class_attrs(cls):
        return f"{cls} has no attribute {rest[0]!r}"
    if rest[0] in INDEX.classes:  # a nested class
        return _resolve_in_class(rest[0], rest[1:])
    for part in rest[1:]:  # past an attribute: its type is unknown, so some class of ours must have the next part
        if not _any_class_has(part):
            return f"no class in nanovllm/ has an attribute {part!r} (after {cls}.{rest[0]})"
    return None


def resolve_dotted(name: str) -> str | None:
    """None if the dotted name is defined (see the module docstring), else why not."""
    parts = name.replace("/", ".").split(".")
    first = parts[0]
    if first in INDEX.classes:
        return _resolve_in_class(first, parts[1:])
    if first in VARIABLES:
        return _resolve_in_class(VARIABLES[first], parts[1:])
    for n in range(len(parts) - 1, 0, -1):  # the longest prefix that is one of our modules
        candidates = _modules_named(parts[:n])
        if not candidates:
            continue
        attr, rest = parts[n], parts[n + 1 :]
        problems = []
        for module in candidates:
            if attr in INDEX.modules[module] or f"{module}.{attr}" in INDEX.modules:
                if not rest:
                    return None
                if attr in INDEX.classes:
                    problem = _resolve_in_class(attr, rest)
                    if problem is None:
                        return None
                    problems.append(problem)
                elif f"{module}.{attr}" in INDEX.modules:
                    if resolve_dotted(f"{module}.{attr}." + ".".join(rest)) is None:
                        return None
                    problems.append(f"{module}.{attr} has no {'.'.join(rest)!r}")
                else:
                    problems.append(f"{module}.{attr} is not a class or module, so it has no {rest[0]!r}")
            else:
                problems.append(f"module {module} defines no {attr!r}")
        return "; ".join(problems)
    if first in OUTSIDE:
        return None
    return f"{first!r} is not a class or module of nanovllm/ (nor a name the test knows from outside: OUTSIDE)"


IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
DOTTED = re.compile(rf"^(?:{IDENT}/)*{IDENT}(?:\.{IDENT})+$")
CALL = re.compile(rf"^({IDENT}(?:[./]{IDENT})*)\(.*\)$")
CAMEL = re.compile(r"^_?[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")
SNAKE = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+$")
# a model folder's files (config.json, ...) and ours: file names, not code names
FILE_SUFFIXES = {s[1:] for s in PATH_SUFFIXES} | {"json", "gguf", "safetensors", "txt", "jinja"}
PROSE_DOTTED = re.compile(rf"(?<![\w./`-])([A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*(?:\.{IDENT})+)")


def check_name(span: str) -> str | None:
    """None if `span` is not a code name or names something that exists; else what is missing."""
    span = span.strip()
    call = CALL.match(span)
    if call:
        span = call.group(1)
        if "." not in span and "/" not in span:
            if span in INDEX.functions or span in INDEX.classes or span in OUTSIDE or hasattr(builtins, span):
                return None
            return f"no function or class named {span!r} in nanovllm/"
    if DOTTED.match(span):
        if span.rsplit(".", 1)[1] in FILE_SUFFIXES:  # a file name (checked as a path where it is one of ours)
            return None
        return resolve_dotted(span)
    if CAMEL.match(span):
        if span in INDEX.classes or span in OUTSIDE or hasattr(builtins, span):
            return None
        return f"no class named {span!r} in nanovllm/"
    if SNAKE.match(span) and not span[0].isdigit():
        if span in INDEX.identifiers or span in OUTSIDE:
            return None
        return f"the identifier {span!r} appears nowhere in nanovllm/"
    return None


# ---- reading a doc ---------------------------------------------------------------------------------------------
@dataclass
class Fence:
    info: str
    start: int  # the line number of its first line of content (1-based)
    lines: list[str]


@dataclass
class Doc:
    path: str
    text_lines: list[tuple[int, str]]  # the lines outside fenced blocks, with their numbers
    fences: list[Fence]


def read_doc(path: str) -> Doc:
    text_lines, fences, fence = [], [], None
    for number, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                fence = Fence(line.strip()[3:].strip(), number + 1, [])
            else:
                fences.append(fence)
                fence = None
            continue
        if fence is not None:
            fence.lines.append(line)
        else:
            text_lines.append((number, line))
    assert fence is None, f"{path}: a fenced block opened at line {fence.start - 1} is never closed"
    return Doc(path, text_lines, fences)


def _plain_lines(doc: Doc) -> list[tuple[int, str]]:
    """The lines read for names and paths: the text, and the un-tagged fenced blocks (diagrams, layouts)."""
    fenced = [(f.start + i, line) for f in doc.fences if not f.info for i, line in enumerate(f.lines)]
    return doc.text_lines + fenced


def _all_lines(doc: Doc) -> list[tuple[int, str]]:
    return doc.text_lines + [(f.start + i, line) for f in doc.fences for i, line in enumerate(f.lines)]


BACKTICKS = re.compile(r"`([^`]+)`")
PATH_TOKEN = re.compile(r"(?<![\w.~/$-])((?:[\w.*-]+/)*[\w*-]+\.(?:py|c|h|md|sh|toml))(?![\w/])")
DIR_TOKEN = re.compile(r"^((?:[\w.-]+/)+)$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def path_exists(token: str) -> bool:
    token = token.removeprefix("./")
    if "*" in token:
        return any(fnmatch.fnmatch(f, token) or fnmatch.fnmatch(f, "*/" + token) for f in INDEX.files)
    return any(f == token or f.endswith("/" + token) for f in INDEX.files)


def dir_exists(token: str) -> bool:
    token = token.rstrip("/")
    return any(d == token or d.endswith("/" + token) for d in INDEX.dirs)


# ---- the checks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc_path", NAMED_DOCS)
def test_named_code_exists(doc_path: str) -> None:
    doc = read_doc(doc_path)
    missing = []
    for number, line in _plain_lines(doc):
        spans = BACKTICKS.findall(line)
        for span in spans:
            problem = check_name(span)
            if problem:
                missing.append(f"{doc_path}:{number}: `{span}`: {problem}")
        prose = BACKTICKS.sub(" ", line)
        for name in PROSE_DOTTED.findall(prose):
            problem = check_name(name)
            if problem:
                missing.append(f"{doc_path}:{number}: {name}: {problem}")
    assert not missing, "the docs name code that does not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc_path", PATH_DOCS)
def test_named_paths_exist(doc_path: str) -> None:
    doc = read_doc(doc_path)
    missing = []
    for number, line in _all_lines(doc):
        for token in PATH_TOKEN.findall(LINK.sub(" ", line)):
            if not path_exists(token):
                missing.append(f"{doc_path}:{number}: {token}: no such file in the repository")
        for span in BACKTICKS.findall(line):
            if DIR_TOKEN.match(span.strip()) and not dir_exists(span.strip()):
                missing.append(f"{doc_path}:{number}: `{span}`: no such directory in the repository")
    assert not missing, "the docs name files that do not exist:\n" + "\n".join(missing)


def _strip_comment(line: str) -> str:
    """The line without its comment (a # outside a string literal)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote and line[i - 1] != "\\":
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _squeeze(text: str) -> str:
    """Whitespace out: what a quote and its source are compared on (comments are stripped before)."""
    return re.sub(r"\s+", "", text)


@dataclass
class Source:
    """A file squeezed (comments and whitespace out), and where its lines start and end in the squeezed text."""

    text: str
    starts: set[int]
    ends: set[int]

    @classmethod
    def read(cls, path: Path) -> "Source":
        text, starts, ends = "", set(), set()
        for line in path.read_text().splitlines():
            squeezed = _squeeze(_strip_comment(line))
            if squeezed:
                starts.add(len(text))
                text += squeezed
                ends.add(len(text))
        return cls(text, starts, ends)

    def find(self, piece: str, at: int, anchored_start: bool, anchored_end: bool) -> int:
        """Where the piece is, at or after `at`, starting and ending on line boundaries where anchored; -1 if not."""
        found = self.text.find(piece, at)
        while found >= 0:
            if (not anchored_start or found in self.starts) and (not anchored_end or found + len(piece) in self.ends):
                return found
            found = self.text.find(piece, found + 1)
        return -1


@dataclass
class Piece:
    text: str
    line: int  # its first line, counted from the quote's first
    anchored_start: bool  # it starts a line (not right after an inline ...)
    anchored_end: bool


def quote_pieces(lines: list[str]) -> list[Piece]:
    """A quote's text cut at each `...`. A piece next to a `...` that stands on its own line (or next to the quote's
    start or end) must begin or end a source line there; next to an inline one it may begin or end mid-line."""
    text = "\n".join(_strip_comment(line) for line in lines)
    pieces, start, anchored = [], 0, True
    for m in re.finditer(r"\.\.\.", text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        line_end = text.find("\n", m.end())
        line_end = len(text) if line_end < 0 else line_end
        alone = not text[line_start : m.start()].strip() and not text[m.end() : line_end].strip()
        pieces.append(Piece(text[start : m.start()], text.count("\n", 0, start), anchored, alone))
        start, anchored = m.end(), alone
    pieces.append(Piece(text[start:], text.count("\n", 0, start), anchored, True))
    return pieces


def _first_miss(piece: Piece, source: Source, at: int) -> int:
    """The piece's first line (from the quote's first) that is not in the source after the lines before it."""
    lines = piece.text.splitlines()
    found = 0
    for n in range(len(lines), 0, -1):
        head = _squeeze("\n".join(lines[:n]))
        if head and source.find(head, at, piece.anchored_start, True) >= 0:
            found = n
            break
    return next((i for i in range(found, len(lines)) if lines[i].strip()), len(lines) - 1)


def _why_missing(piece: Piece, source: Source, at: int) -> str:
    squeezed = _squeeze(piece.text)
    miss = piece.text.splitlines()[_first_miss(piece, source, at)].strip()
    if source.find(squeezed, 0, False, False) < 0:
        return f"not there from this line on: {miss!r}"
    if source.find(squeezed, 0, piece.anchored_start, piece.anchored_end) < 0:
        return f"there only as part of a line (mark the cut with an inline ...): {miss!r}"
    return f"there only before the quote's previous lines: {miss!r}"


@pytest.mark.parametrize("doc_path", NAMED_DOCS)
def test_quotes_are_in_their_source(doc_path: str) -> None:
    doc = read_doc(doc_path)
    problems = []
    for fence in doc.fences:
        words = fence.info.split()
        if not words or words[0] != "python":
            continue
        if len(words) == 1:  # an example for the reader: it must at least be Python
            try:
                ast.parse("\n".join(fence.lines))
            except SyntaxError as e:
                problems.append(f"{doc_path}:{fence.start + (e.lineno or 1) - 1}: the example is not Python: {e.msg}")
            continue
        if len(words) != 3 or words[1] != "from":
            problems.append(f"{doc_path}:{fence.start - 1}: a quote's info string is `python from PATH`, got {words}")
            continue
        if not (ROOT / words[2]).is_file():
            problems.append(f"{doc_path}:{fence.start - 1}: the quote's source {words[2]} does not exist")
            continue
        source, at = Source.read(ROOT / words[2]), 0
        for piece in quote_pieces(fence.lines):
            squeezed = _squeeze(piece.text)
            if not squeezed:
                continue
            found = source.find(squeezed, at, piece.anchored_start, piece.anchored_end)
            if found < 0:
                problems.append(
                    f"{doc_path}:{fence.start + piece.line + _first_miss(piece, source, at)}: quoted from "
                    f"{words[2]}, {_why_missing(piece, source, at)}"
                )
                continue
            at = found + len(squeezed)
    assert not problems, "the docs quote code that is not in its source:\n" + "\n".join(problems)


def _layout_fence() -> Fence:
    doc = read_doc("docs/design.md")
    in_layout = False
    for number, line in doc.text_lines:
        if line.startswith("## "):
            in_layout = line.strip() == "## Layout"
        if in_layout:
            after = [f for f in doc.fences if f.start > number]
            return after[0]
    raise AssertionError("docs/design.md has no '## Layout' section with a fenced tree")


def test_layout_names_every_module_and_benchmark() -> None:
    fence = _layout_fence()
    stack: list[tuple[int, str]] = []  # (indent, directory path)
    described: dict[str, str] = {}  # path -> its description (continuations joined)
    problems, last = [], None
    for i, line in enumerate(fence.lines):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent >= 24:  # a description's continuation
            described[last] += " " + line.strip()
            continue
        entry, _, description = line.strip().partition("  ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else "") + entry
        last = path
        described[path] = description.strip()
        if entry.endswith("/"):
            stack.append((indent, path))
            if not (ROOT / path).is_dir():
                problems.append(f"docs/design.md:{fence.start + i}: the layout's {path} is not a directory")
        elif not (ROOT / path).is_file():
            problems.append(f"docs/design.md:{fence.start + i}: the layout's {path} is not a file")
    for module in [*sorted(PACKAGE.rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.*"))]:
        rel = str(module.relative_to(ROOT))
        if module.name in SKIP_FILES or rel in described:
            continue
        parent = str(module.parent.relative_to(ROOT)) + "/"
        words = re.findall(r"[\w.]+", described.get(parent, "").lower())
        if module.name not in words and module.stem not in words and module.stem.replace("_", " ") not in words:
            problems.append(f"docs/design.md: the layout does not name {rel} (as an entry, or in {parent}'s text)")
    assert not problems, "docs/design.md's layout is stale:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc_path", LINKED_DOCS)
def test_links_land(doc_path: str) -> None:
    doc = read_doc(doc_path)
    problems = []
    for number, line in doc.text_lines:
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                problems.append(f"{doc_path}:{number}: {target}: a link outside the repository")
                continue
            file, _, anchor = target.partition("#")
            dest = (ROOT / doc_path).parent / file if file else ROOT / doc_path
            if not dest.exists():
                problems.append(f"{doc_path}:{number}: {target}: {file} does not exist")
                continue
            if anchor and dest.suffix == ".md" and anchor not in _doc_anchors(dest):
                problems.append(f"{doc_path}:{number}: {target}: {dest.name} has no heading with the anchor #{anchor}")
    assert not problems, "the docs link where nothing is:\n" + "\n".join(problems)


def _doc_anchors(path: Path) -> set[str]:
    """The anchors of the headings outside fenced blocks."""
    rel = str(path.resolve().relative_to(ROOT))
    doc = read_doc(rel)
    anchors, counts = set(), {}
    for _, line in doc.text_lines:
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors
