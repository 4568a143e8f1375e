"""The embedded multiple-choice task: which function of a standard-library module does a
docstring describe? Built from the Python installation itself, so it needs no download.

For each module of :data:`MODULES` (pure-Python standard-library modules; the source file is parsed
with :mod:`ast`, nothing is imported), every public top-level function with a docstring gives a
candidate: its *summary* is the first line of the cleaned docstring, kept when it has 4 to 30
words and does not contain the function's own name. A module needs at least 4 candidates. Each
candidate becomes one item::

    context: In Python's textwrap module, the function documented as "Remove any common leading
             whitespace from every line in `text`." is named
    choices: dedent | fill | indent | shorten        (the right one and 3 others of the same module)

The 3 distractors and the position of the right answer are drawn with ``random.Random(seed)``
from the sorted candidates, and at most ``max_items`` items are kept (a seeded sample, in
module/name order), so the task is the same on every run of the same Python version. Docstrings
change between Python versions, and with them the items. The standard library's docstrings are
also part of the embedded distillation corpus, which splits whole packages into training and
held-out sets; this task checks that a model links a description to a name, not held-out text.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import random
from pathlib import Path

from lrc.eval.mc import MCItem

__all__ = ["MODULES", "TASK_NAME", "build_pydoc_items", "module_candidates"]

TASK_NAME = "pydoc_mc"
MODULES = (
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "dis", "filecmp", "fnmatch",
    "fractions", "ftplib", "genericpath", "getpass", "gettext", "glob", "gzip", "heapq", "hmac", "imghdr",
    "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "mimetypes", "ntpath", "operator",
    "os", "pickle", "pkgutil", "platform", "plistlib", "posixpath", "pprint", "quopri", "random", "re",
    "shlex", "shutil", "site", "smtplib", "socket", "ssl", "statistics", "string", "subprocess",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback", "types",
    "typing", "uu", "uuid", "warnings", "weakref", "webbrowser", "zipfile",
)
CHOICES = 4
MIN_WORDS, MAX_WORDS = 4, 30


def _source(module: str) -> str | None:
    """The module's Python source, found without importing it (``None``: absent or not Python)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return None
    try:
        return Path(origin).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def module_candidates(source: str) -> list[tuple[str, str]]:
    """``(name, summary)`` of the public top-level functions of ``source`` that make an item, by name."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        lines = inspect.cleandoc(doc).strip().splitlines()
        summary = " ".join(lines[0].split()) if lines else ""
        if MIN_WORDS <= len(summary.split()) <= MAX_WORDS and node.name.lower() not in summary.lower():
            found.setdefault(node.name, summary)  # the first definition wins (platform variants follow)
    return sorted(found.items())


def build_pydoc_items(max_items: int = 200, seed: int = 0, modules: tuple[str, ...] = MODULES) -> list[MCItem]:
    """The task's items (see the module doc). ``ValueError`` if the installation yields none."""
    rng = random.Random(seed)
    items: list[tuple[str, str, MCItem]] = []
    for module in sorted(modules):
        source = _source(module)
        candidates = module_candidates(source) if source else []
        if len(candidates) < CHOICES:
            continue
        names = [n for n, _ in candidates]
        for name, summary in candidates:
            others = rng.sample([n for n in names if n != name], CHOICES - 1)
            gold = rng.randrange(CHOICES)
            choices = others[:gold] + [name] + others[gold:]
            context = f'In Python\'s {module} module, the function documented as "{summary}" is named'
            items.append((module, name, MCItem(context, tuple(choices), gold)))
    if not items:
        raise ValueError("no standard-library module gave a multiple-choice item (no Python sources installed?)")
    if max_items is not None and len(items) > max_items:
        keep = set(rng.sample(range(len(items)), max_items))
        items = [it for i, it in enumerate(items) if i in keep]
    return [item for _, _, item in items]
