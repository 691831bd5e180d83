"""The package layout's rules (docs/architecture.rst): which room may import which.

The tables below are the one place the rules live. A failure here names the importing module,
the imported one and the rule it breaks; change the code (usually: name what you need as a
Protocol in your own room, and let ``ops.service`` pass the real thing in), or, if the rule is
what is wrong, change the table and docs/architecture.rst together.

The graph is read with ``ast`` from the source, so it sees every import: at module level, inside
functions, and under ``if TYPE_CHECKING:`` (a type-only import is still an arrow between rooms).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from twisted.trial import unittest

PACKAGE = Path(__file__).resolve().parent.parent / "cocalcproxy"

#: Each room (a subpackage of cocalcproxy, or ``pages``) and the rooms it may import besides
#: itself. The request flows down the story (front door, guard, handlers), but the imports run
#: the other way: the front door (``http``) defines the request and the Guard/Handler
#: protocols, and guard and handlers import those. Only ``ops`` (which wires the proxy
#: together) sees everything; guard and handlers never see each other.
ALLOWED: dict[str, frozenset[str]] = {
    "ops": frozenset({"http", "guard", "handlers", "directory", "pages"}),
    "guard": frozenset({"http", "directory", "pages"}),
    "handlers": frozenset({"http", "directory", "pages"}),
    "http": frozenset({"directory", "pages"}),
    "directory": frozenset(),
    "pages": frozenset(),
    "": frozenset(),  # cocalcproxy/__init__.py
}

#: Single arrows the room rules would refuse, each with why it is allowed anyway.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("cocalcproxy.pages", "cocalcproxy.http.routing"): (
        "a type only (under TYPE_CHECKING): page links are routing.AbsoluteUrl values"
    ),
}

#: Single arrows the room rules would allow but that must never exist.
FORBIDDEN: dict[tuple[str, str], str] = {
    ("cocalcproxy.http.prebody", "cocalcproxy.http.site"): (
        "site uses prebody's plan; the reverse would close the old site <-> prebody circle"
    ),
}

#: Pure cores: they import neither Twisted nor zope, and are tested without a reactor.
PURE: frozenset[str] = frozenset(
    {
        "cocalcproxy.http.routing",
        "cocalcproxy.http.headers",
        "cocalcproxy.http.headlimit",
        "cocalcproxy.http.prebody",
        "cocalcproxy.guard.policy",
        "cocalcproxy.guard.cache",
        "cocalcproxy.guard.hopkeys",
        "cocalcproxy.guard.devices",
        "cocalcproxy.handlers.backends",
        "cocalcproxy.handlers.rawfs",
        "cocalcproxy.handlers.rawhttp",
        "cocalcproxy.handlers.rawpath",
        "cocalcproxy.handlers.relay.frames",
        "cocalcproxy.directory.ports",
        "cocalcproxy.directory.addresses",
        "cocalcproxy.directory.validate",
    }
)


@dataclass(frozen=True)
class Arrow:
    source: str
    target: str
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(root: Path, name: str) -> str:
    """``name`` if it is a module or package under ``root``, else the longest prefix that is."""
    parts = name.split(".")
    while len(parts) > 1:
        where = root.parent.joinpath(*parts)
        if where.with_suffix(".py").is_file() or (where / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return parts[0]


def arrows(root: Path) -> list[Arrow]:
    """Every import of one of ``root``'s modules by another, read from the source."""
    top = root.name
    found: list[Arrow] = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(root, path)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = source.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                # each name is the module it names, or else a name in ``module``
                names = [f"{module}.{alias.name}" for alias in node.names]
            for name in names:
                if name == top or name.startswith(top + "."):
                    target = resolve(root, name)
                    if target != source:
                        found.append(Arrow(source, target, node.lineno))
    return sorted(set(found), key=lambda a: (a.source, a.target, a.line))


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(root: Path) -> list[str]:
    """Each arrow that breaks a rule, as one readable line."""
    problems = []
    for arrow in arrows(root):
        pair = (arrow.source, arrow.target)
        where = f"{arrow.source} (line {arrow.line}) imports {arrow.target}"
        if pair in FORBIDDEN:
            problems.append(f"{where}: forbidden: {FORBIDDEN[pair]}")
            continue
        src, dst = room(arrow.source), room(arrow.target)
        if src == dst or arrow.target == root.name:  # "from cocalcproxy import x" names x too
            continue
        if src not in ALLOWED:
            problems.append(f"{where}: room {src!r} has no row in ALLOWED")
        elif dst not in ALLOWED[src] and pair not in EXCEPTIONS:
            problems.append(f"{where}: room {src!r} may not import room {dst!r}")
    return problems


def twisted_imports(root: Path, module: str) -> list[str]:
    path = root.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append(node.module)
    return [n for n in found if n.split(".")[0] in ("twisted", "zope")]


class LayoutRulesTests(unittest.TestCase):
    def test_no_room_imports_one_it_must_not(self) -> None:
        self.assertEqual(violations(PACKAGE), [])

    def test_every_room_has_a_row(self) -> None:
        rooms = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
        self.assertEqual(rooms - set(ALLOWED), set())
        # and no module lives loose beside the rooms (the tree tells the story)
        self.assertEqual(sorted(p.name for p in PACKAGE.glob("*.py")), ["__init__.py"])

    def test_exceptions_and_forbidden_arrows_name_real_modules(self) -> None:
        modules = {module_name(PACKAGE, p) for p in PACKAGE.rglob("*.py")}
        for source, target in [*EXCEPTIONS, *FORBIDDEN]:
            self.assertIn(source, modules)
            self.assertIn(target, modules)
        self.assertEqual(PURE - modules, set())

    def test_pure_cores_import_no_twisted(self) -> None:
        for module in sorted(PURE):
            self.assertEqual(twisted_imports(PACKAGE, module), [], module)

    def test_the_graph_sees_imports_of_every_form(self) -> None:
        """Known arrows of each form are found: plain, from-import of a module, and a type-only
        import under TYPE_CHECKING."""
        found = {(a.source, a.target) for a in arrows(PACKAGE)}
        self.assertIn(("cocalcproxy.http.site", "cocalcproxy.http.prebody"), found)
        self.assertIn(("cocalcproxy.ops.service", "cocalcproxy.handlers.relay"), found)
        self.assertIn(("cocalcproxy.pages", "cocalcproxy.http.routing"), found)  # TYPE_CHECKING


class CheckerCatchesViolationsTests(unittest.TestCase):
    """The checker itself, on a planted copy of the rooms with one bad arrow each."""

    def plant(self, files: dict[str, str]) -> Path:
        root = Path(self.mktemp()).resolve() / "cocalcproxy"
        for name, text in {"__init__.py": "", **files}.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return root

    def test_an_upward_import_is_caught(self) -> None:
        root = self.plant(
            {
                "http/__init__.py": "",
                "http/site.py": "X = 1\n",
                "directory/__init__.py": "",
                "directory/model.py": "from cocalcproxy.http.site import X\n",
            }
        )
        self.assertEqual(
            violations(root),
            [
                "cocalcproxy.directory.model (line 1) imports cocalcproxy.http.site: "
                "room 'directory' may not import room 'http'"
            ],
        )

    def test_a_sideways_relative_type_only_import_is_caught(self) -> None:
        root = self.plant(
            {
                "guard/__init__.py": "",
                "guard/core.py": "",
                "handlers/__init__.py": "",
                "handlers/forward.py": (
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n"
                    "    from ..guard import core\n"
                ),
            }
        )
        self.assertEqual(
            violations(root),
            [
                "cocalcproxy.handlers.forward (line 3) imports cocalcproxy.guard.core: "
                "room 'handlers' may not import room 'guard'"
            ],
        )

    def test_a_forbidden_arrow_inside_a_room_is_caught(self) -> None:
        root = self.plant(
            {
                "http/__init__.py": "",
                "http/site.py": "from cocalcproxy.http import prebody\n",
                "http/prebody.py": "def plan():\n    from cocalcproxy.http import site\n",
            }
        )
        problems = violations(root)
        self.assertEqual(len(problems), 1)
        self.assertIn(
            "cocalcproxy.http.prebody (line 2) imports cocalcproxy.http.site", problems[0]
        )
        self.assertIn("forbidden", problems[0])

    def test_a_new_room_needs_a_row(self) -> None:
        root = self.plant(
            {
                "extras/__init__.py": "",
                "extras/thing.py": "import cocalcproxy.pages\n",
                "pages/__init__.py": "",
            }
        )
        self.assertEqual(
            violations(root),
            [
                "cocalcproxy.extras.thing (line 1) imports cocalcproxy.pages: "
                "room 'extras' has no row in ALLOWED"
            ],
        )

    def test_a_clean_tree_passes(self) -> None:
        root = self.plant(
            {
                "http/__init__.py": "",
                "http/site.py": "from cocalcproxy.directory import model\n",
                "directory/__init__.py": "",
                "directory/model.py": "",
            }
        )
        self.assertEqual(violations(root), [])
