"""The structure of nexo_poller.py, checked like an import-linter contract
for one file (issue 22 item 5), with the standard ``ast`` module.

The file is cut into sections by its banners (a ``# ====`` line, then
``# <Name>``); the module docstring lists the section names in dependency
order.  The rules:

    section-order      the banners are the docstring's sections, in its order
    forward-reference  a module-level name used in a section is defined in
                       that section or an earlier one (DELIBERATE_LATE_BINDINGS
                       lists the few allowed exceptions, each with its reason)
    private-name       no use of another section's private (``_x``) module name,
                       except that the private names defined in the ``Helpers``
                       section may be used by every later section
    private-attribute  no ``obj._x`` where ``_x`` is a private attribute owned
                       only by classes of other sections (``self._x`` inside
                       a class is always its own business)
    class-size         no class longer than CLASS_LINE_LIMIT lines

A failure names the line and the rule.  Main does not meet the contract
yet: KNOWN_VIOLATIONS is the part of issue 22's refactor still to do,
73 entries (private-name 66, private-attribute 2, class-size 2,
forward-reference 3), written as (rule, section, name) without line
numbers so that it survives edits.  The test fails on a violation outside the
baseline, and on a baseline entry that no longer occurs: the list only
shrinks.  After a refactor, print the current violations in baseline
format with::

    python tests/test_structure.py --print-baseline
"""

import ast
import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import NEXO  # noqa: E402

CLASS_LINE_LIMIT = 400

# The section of small private helpers every later section may use (bottle.py's
# model of one "helpers used everywhere" section near the top).
HELPERS_SECTION = "Helpers"

# Uses of a later section's name that are part of the design, not debt:
# (section using it, name, why).
DELIBERATE_LATE_BINDINGS = {
    ("Runner", "_start_http"):
        "Runner.start() starts the HTTP faces, which read the Runner: the one "
        "cycle between the two, broken by a call-time lookup",
}

# What remains of issue 22's refactor: (rule, section, name).  Remove an
# entry when its violation is gone; never add one to let new code in.
KNOWN_VIOLATIONS = {
    # class-size: 2
    ('class-size', 'Broker', 'BrokerServer'),
    ('class-size', 'NATS', 'NatsClient'),
    # forward-reference: 3
    ('forward-reference', 'Broker', 'nexo_event'),
    ('forward-reference', 'Manifest', '_StdioChannel'),
    ('forward-reference', 'Runner', '_outbox_counts'),
    # private-attribute: 2
    ('private-attribute', 'HTTP', '_lock'),
    ('private-attribute', 'SDK', '_handlers_done'),
    # private-name: 66
    ('private-name', 'Broker', '_ForwardBroker'),
    ('private-name', 'CLI', '_ADMIN_TOKEN_ENV'),
    ('private-name', 'CLI', '_ADMIN_URL_ENV'),
    ('private-name', 'CLI', '_NoStateYet'),
    ('private-name', 'CLI', '_admin_token'),
    ('private-name', 'CLI', '_become_subreaper'),
    ('private-name', 'CLI', '_config_state'),
    ('private-name', 'CLI', '_cursor_line'),
    ('private-name', 'CLI', '_cursor_text'),
    ('private-name', 'CLI', '_cursor_view'),
    ('private-name', 'CLI', '_daemons_line'),
    ('private-name', 'CLI', '_is_nats'),
    ('private-name', 'CLI', '_job_status'),
    ('private-name', 'CLI', '_new_owner'),
    ('private-name', 'CLI', '_no_history'),
    ('private-name', 'CLI', '_pid_alive'),
    ('private-name', 'CLI', '_plugin_for'),
    ('private-name', 'CLI', '_relative'),
    ('private-name', 'CLI', '_state_backend'),
    ('private-name', 'CLI', '_status_dict'),
    ('private-name', 'CLI', '_tick_budget'),
    ('private-name', 'CLI', '_wake_owner'),
    ('private-name', 'Config', '_DAEMON_TTL_SECS'),
    ('private-name', 'Config', '_TOPIC_TOKEN_RE'),
    ('private-name', 'Config', '_is_nats'),
    ('private-name', 'Config', '_json_type'),
    ('private-name', 'Config', '_lifecycle_rules'),
    ('private-name', 'Config', '_nats_servers'),
    ('private-name', 'Config', '_parse_instant'),
    ('private-name', 'Config', '_state_backend'),
    ('private-name', 'HTTP', '_cursor_view'),
    ('private-name', 'HTTP', '_host_name'),
    ('private-name', 'Manifest', '_StdioChannel'),
    ('private-name', 'NATS', '_ClientBase'),
    ('private-name', 'NATS', '_NEXO_SOURCE'),
    ('private-name', 'NATS', '_broker_error'),
    ('private-name', 'Processes', '_reply_to_ack'),
    ('private-name', 'Proxies', '_Failure'),
    ('private-name', 'Proxies', '_Lines'),
    ('private-name', 'Proxies', '_child_env'),
    ('private-name', 'Proxies', '_exit_status'),
    ('private-name', 'Proxies', '_kill_group'),
    ('private-name', 'Proxies', '_parse_reply_envelope'),
    ('private-name', 'Proxies', '_pidfd'),
    ('private-name', 'Proxies', '_popen'),
    ('private-name', 'Proxies', '_reap'),
    ('private-name', 'Proxies', '_reply_to_ack'),
    ('private-name', 'Proxies', '_sweep_orphans'),
    ('private-name', 'Proxies', '_unparsable'),
    ('private-name', 'Proxies', '_wait_exit'),
    ('private-name', 'Runner', '_command_source'),
    ('private-name', 'Runner', '_config_state'),
    ('private-name', 'Runner', '_is_nats'),
    ('private-name', 'Runner', '_lifecycle_rules'),
    ('private-name', 'Runner', '_nats_url_as'),
    ('private-name', 'Runner', '_outbox_counts'),
    ('private-name', 'Runner', '_outbox_share'),
    ('private-name', 'Runner', '_plugin_for'),
    ('private-name', 'Runner', '_proxy_for'),
    ('private-name', 'Runner', '_redact_url'),
    ('private-name', 'Runner', '_start_http'),
    ('private-name', 'Runner', '_wake_owner'),
    ('private-name', 'SDK', '_STDERR_KEEP_BYTES'),
    ('private-name', 'State', '_is_nats'),
    ('private-name', 'State', '_nats_parse_headers'),
    ('private-name', 'State', '_uuid4'),
}


_BANNER = re.compile(r"#\s*={10,}\s*$")
_TITLE = re.compile(r"#\s+(\S.*?)\s*$")


class Violation:
    """One broken rule at one line."""

    def __init__(self, rule: str, section: str, name: str, line: int, detail: str):
        self.rule, self.section, self.name = rule, section, name
        self.line, self.detail = line, detail

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.rule, self.section, self.name)

    def __str__(self) -> str:
        return f"line {self.line}: [{self.rule}] section {self.section}: {self.detail}"


def docstring_sections(tree: ast.Module) -> list[str]:
    """The section names the module docstring lists, in order: the lines
    indented four spaces under "The sections of this file", each name ending
    at the first double space."""
    doc = ast.get_docstring(tree, clean=False) or ""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith("The sections of this file")), None)
    if start is None:
        return []
    names = []
    for line in lines[start + 1:]:
        if not line.strip():
            if names:
                break
            continue
        if not line.startswith("    "):
            break
        if not line.startswith("     "):
            names.append(re.split(r"\s{2,}", line.strip())[0])
    return names


def banner_sections(source: str) -> list[tuple[str, int]]:
    """(title, line) of every opening banner: a ``# ====`` line not preceded
    by a comment, whose next line is ``# <Title>``."""
    lines = source.splitlines()
    found = []
    for i, line in enumerate(lines):
        if not _BANNER.match(line) or i + 1 >= len(lines):
            continue
        if i > 0 and lines[i - 1].lstrip().startswith("#"):
            continue        # the closing banner of a header
        title = _TITLE.match(lines[i + 1])
        if title:
            found.append((title.group(1), i + 1))
    return found


class _Sections:
    """Which section a line falls in; the lines before the first banner
    (imports, ``__all__``) belong to the preamble, index -1."""

    PREAMBLE = "(preamble)"

    def __init__(self, banners: list[tuple[str, int]]):
        self.banners = banners

    def index(self, line: int) -> int:
        found = -1
        for i, (_, start) in enumerate(self.banners):
            if start <= line:
                found = i
        return found

    def name(self, index: int) -> str:
        return self.PREAMBLE if index < 0 else self.banners[index][0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _target_names(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]


def _bound_names(body: list[ast.stmt]) -> tuple[set[str], set[str]]:
    """The names a scope's own statements bind, and those it declares
    ``global``; nested functions and classes bind only their own name."""
    bound, declared = set(), set()
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                             ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Global):
            declared.update(node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.NamedExpr):
            bound.update(_target_names(node.target))
        elif isinstance(node, ast.MatchAs) and node.name:
            bound.add(node.name)
        stack.extend(ast.iter_child_nodes(node))
    return bound - declared, declared


def _function_bindings(node) -> set[str]:
    args = node.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    params += [a for a in (args.vararg, args.kwarg) if a]
    names = {a.arg for a in params}
    if isinstance(node, ast.Lambda):
        return names
    bound, _ = _bound_names(node.body)
    return names | bound


class _Uses(ast.NodeVisitor):
    """Every use of a module-level name (resolved through the enclosing
    function scopes) and every ``x._attr`` that is not ``self``/``cls``,
    with its line; and the private attributes each class defines."""

    def __init__(self, globals_: set[str]):
        self.globals = globals_
        self.scopes: list[tuple[str, set[str]]] = []     # (kind, names bound)
        self.name_uses: list[tuple[str, int]] = []
        self.attr_uses: list[tuple[str, int]] = []
        self.attr_owned: list[tuple[str, int]] = []      # private attrs a class defines
        self.in_class = 0

    # -- names
    def _resolves_global(self, name: str) -> bool:
        if name not in self.globals:
            return False
        for i, (kind, bound) in enumerate(reversed(self.scopes)):
            # A class body's names are visible only to its own body.
            if kind == "class" and i > 0:
                continue
            if name in bound:
                return False
        return True

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and self._resolves_global(node.id):
            self.name_uses.append((node.id, node.lineno))

    def _annotation(self, node) -> None:
        """Annotations are dependencies too, quoted or not."""
        if node is None:
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                parsed = ast.parse(node.value, mode="eval")
            except SyntaxError:
                return
            for sub in ast.walk(parsed):
                if isinstance(sub, ast.Name) and self._resolves_global(sub.id):
                    self.name_uses.append((sub.id, node.lineno))
            return
        self.visit(node)

    # -- scopes
    def _visit_function(self, node) -> None:
        for deco in node.decorator_list:
            self.visit(deco)
        args = node.args
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is not None:
                self._annotation(a.annotation)
        self._annotation(node.returns)
        if self.in_class and self.scopes and self.scopes[-1][0] == "class" \
                and _is_private(node.name):
            self.attr_owned.append((node.name, node.lineno))
        self.scopes.append(("function", _function_bindings(node)))
        outer_class, self.in_class = self.in_class, self.in_class
        for stmt in node.body:
            self.visit(stmt)
        self.in_class = outer_class
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        self.scopes.append(("function", _function_bindings(node)))
        self.visit(node.body)
        self.scopes.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        bound, _ = _bound_names(node.body)
        for name in bound:
            if _is_private(name):
                self.attr_owned.append((name, node.lineno))
        self.scopes.append(("class", bound))
        self.in_class += 1
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign):
                self._annotation(stmt.annotation)
                if stmt.value is not None:
                    self.visit(stmt.value)
            else:
                self.visit(stmt)
        self.in_class -= 1
        self.scopes.pop()

    def _visit_comprehension(self, node) -> None:
        bound = set()
        for gen in node.generators:
            bound.update(_target_names(gen.target))
        self.scopes.append(("function", bound))
        self.generic_visit(node)
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _visit_comprehension

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._annotation(node.annotation)
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    # -- attributes
    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _is_private(node.attr):
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if own and self.in_class:
                if isinstance(node.ctx, ast.Store):
                    self.attr_owned.append((node.attr, node.lineno))
            else:
                self.attr_uses.append((node.attr, node.lineno))
        self.generic_visit(node)


def _module_definitions(tree: ast.Module) -> dict[str, int]:
    """Each module-level name and the line of its first definition (top-level
    statements, and ``global`` names assigned inside functions)."""
    first: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        first[name] = min(line, first.get(name, line))

    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            add(stmt.name, stmt.lineno)
            continue
        bound, _ = _bound_names([stmt])
        for name in bound:
            add(name, stmt.lineno)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _, declared = _bound_names(node.body)
            for name in declared:
                add(name, node.lineno)
    return first


def check(source: str, *, class_limit: int = CLASS_LINE_LIMIT,
          late_bindings=frozenset()) -> list[Violation]:
    """Every violation of the rules in ``source``, in line order.
    ``late_bindings`` holds (section, name) pairs allowed to refer forward."""
    tree = ast.parse(source)
    out: list[Violation] = []
    listed = docstring_sections(tree)
    banners = banner_sections(source)
    titles = [t for t, _ in banners]
    for i, (title, line) in enumerate(banners):
        if title not in listed:
            out.append(Violation("section-order", title, title, line,
                                 f"banner {title!r} is not a section of the docstring"))
        elif i > 0 and banners[i - 1][0] in listed and \
                listed.index(banners[i - 1][0]) > listed.index(title):
            out.append(Violation("section-order", title, title, line,
                                 f"banner {title!r} comes after {banners[i - 1][0]!r}, "
                                 "against the docstring's order"))
    for name in listed:
        if name not in titles:
            out.append(Violation("section-order", name, name, 1,
                                 f"the docstring's section {name!r} has no banner"))
    sections = _Sections(banners)
    defs = _module_definitions(tree)
    home = {name: sections.index(line) for name, line in defs.items()}

    uses = _Uses(set(defs))
    for stmt in tree.body:
        uses.visit(stmt)
    seen = set()
    for name, line in uses.name_uses:
        where = sections.index(line)
        here, there = sections.name(where), sections.name(home[name])
        if home[name] > where and (here, name) not in late_bindings:
            key = ("forward-reference", here, name, line)
            if key not in seen:
                seen.add(key)
                out.append(Violation("forward-reference", here, name, line,
                                     f"{name} is defined in the later section {there}"))
        shared = there == HELPERS_SECTION and home[name] < where
        if _is_private(name) and home[name] != where and home[name] >= 0 and not shared:
            key = ("private-name", here, name, line)
            if key not in seen:
                seen.add(key)
                out.append(Violation("private-name", here, name, line,
                                     f"{name} is private to section {there}"))
    owners: dict[str, set[int]] = {}
    for attr, line in uses.attr_owned:
        owners.setdefault(attr, set()).add(sections.index(line))
    for attr, line in uses.attr_uses:
        where = sections.index(line)
        owned = owners.get(attr)
        if owned and where not in owned:
            others = ", ".join(sorted(sections.name(i) for i in owned))
            key = ("private-attribute", sections.name(where), attr, line)
            if key not in seen:
                seen.add(key)
                out.append(Violation("private-attribute", sections.name(where), attr, line,
                                     f"._{attr.lstrip('_')} is a private attribute of "
                                     f"section {others}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            if size > class_limit:
                out.append(Violation("class-size", sections.name(sections.index(node.lineno)),
                                     node.name, node.lineno,
                                     f"class {node.name} is {size} lines "
                                     f"(limit {class_limit})"))
    out.sort(key=lambda v: (v.line, v.rule, v.name))
    return out


def nexo_violations(late_bindings=tuple(DELIBERATE_LATE_BINDINGS)) -> list[Violation]:
    with open(NEXO, encoding="utf-8") as f:
        return check(f.read(), late_bindings=set(late_bindings))


def baseline_text(violations: list[Violation]) -> str:
    """The violations as KNOWN_VIOLATIONS entries, one per (rule, section,
    name), under a comment per rule with its count."""
    keys = sorted({v.key for v in violations})
    out = []
    for rule in sorted({k[0] for k in keys}):
        mine = [k for k in keys if k[0] == rule]
        out.append(f"    # {rule}: {len(mine)}\n")
        out.extend(f"    {k!r},\n" for k in mine)
    return "".join(out)


class NexoStructureTest(unittest.TestCase):
    """nexo_poller.py against the contract, minus the known debt."""

    @classmethod
    def setUpClass(cls):
        cls.found = nexo_violations()

    def test_no_new_violation(self):
        new = [str(v) for v in self.found if v.key not in KNOWN_VIOLATIONS]
        self.assertEqual(new, [], "nexo_poller.py breaks its structure rules:\n"
                         + "\n".join(new))

    def test_baseline_only_shrinks(self):
        keys = {v.key for v in self.found}
        gone = sorted(k for k in KNOWN_VIOLATIONS if k not in keys)
        self.assertEqual(gone, [], "fixed: remove these from KNOWN_VIOLATIONS in "
                         "tests/test_structure.py: " + repr(gone))

    def test_late_bindings_still_used(self):
        """An allowed late binding the file no longer uses is removed."""
        used = {(v.section, v.name) for v in nexo_violations(late_bindings=())
                if v.rule == "forward-reference"}
        stale = sorted(set(DELIBERATE_LATE_BINDINGS) - used)
        self.assertEqual(stale, [], "remove from DELIBERATE_LATE_BINDINGS: " + repr(stale))

    def test_sections_found(self):
        """The checker read the sections at all (an empty file of sections
        would pass every other rule)."""
        with open(NEXO, encoding="utf-8") as f:
            source = f.read()
        listed = docstring_sections(ast.parse(source))
        self.assertGreaterEqual(len(listed), 10)
        self.assertEqual([t for t, _ in banner_sections(source)], listed)


_SYNTHETIC = '''"""A toy.

The sections of this file, in dependency order:

    Alpha       first
                (continued)
    Beta        second
"""

import os

# ==========================================
# Alpha
# The first section.
# ==========================================

_SECRET = 1


class Store:
    def __init__(self):
        self._rows = []

    def add(self, row):
        self._rows.append(row)
        return later()


def uses_own():
    return _SECRET, os.sep


# ==========================================
# Beta
# The second section.
# ==========================================

def later():
    return 2


def peek(store: Store):
    size = len(store._rows)
    return size + _SECRET


class Big:
    def one(self):
        x = 1
        y = 2
        z = 3
        return x + y + z
'''


class CheckerTest(unittest.TestCase):
    """The checker itself, on a small source that breaks each rule once."""

    def setUp(self):
        self.found = check(_SYNTHETIC, class_limit=5)
        self.lines = _SYNTHETIC.splitlines()

    def only(self, rule):
        return [v for v in self.found if v.rule == rule]

    def line_of(self, text):
        return next(i for i, line in enumerate(self.lines, 1) if text in line)

    def test_sections_are_read(self):
        tree = ast.parse(_SYNTHETIC)
        self.assertEqual(docstring_sections(tree), ["Alpha", "Beta"])
        self.assertEqual(self.only("section-order"), [])

    def test_private_attribute_reach_is_caught_with_its_line(self):
        [v] = self.only("private-attribute")
        self.assertEqual((v.section, v.name), ("Beta", "_rows"))
        self.assertEqual(v.line, self.line_of("store._rows"))
        self.assertIn(f"line {v.line}: [private-attribute]", str(v))

    def test_private_name_of_another_section_is_caught(self):
        [v] = self.only("private-name")
        self.assertEqual((v.section, v.name, v.line),
                         ("Beta", "_SECRET", self.line_of("size + _SECRET")))

    def test_forward_reference_is_caught(self):
        [v] = self.only("forward-reference")
        self.assertEqual((v.section, v.name, v.line),
                         ("Alpha", "later", self.line_of("return later()")))
        allowed = check(_SYNTHETIC, class_limit=5, late_bindings={("Alpha", "later")})
        self.assertNotIn("forward-reference", {v.rule for v in allowed})

    def test_oversize_class_is_caught(self):
        self.assertEqual([(v.section, v.name, v.line) for v in self.only("class-size")],
                         [("Alpha", "Store", self.line_of("class Store")),
                          ("Beta", "Big", self.line_of("class Big"))])

    def test_a_local_name_is_not_a_use_of_the_global(self):
        source = _SYNTHETIC.replace("return later()", "later = len\n        return later()")
        self.assertEqual([v for v in check(source, class_limit=50)
                          if v.rule == "forward-reference"], [])

    def test_sections_out_of_order_are_caught(self):
        source = _SYNTHETIC.replace("    Alpha       first\n                (continued)\n",
                                    "").replace("second\n", "second\n    Alpha       x\n")
        [v] = [v for v in check(source) if v.rule == "section-order"]
        self.assertEqual(v.section, "Beta")

    def test_helpers_private_names_are_shared_with_later_sections_only(self):
        """A private name of the Helpers section may be used by every later
        section; a section before it still may not (nor another section's)."""
        source = _SYNTHETIC.replace("    Beta        second\n",
                                    "    Helpers     shared\n    Beta        second\n")
        source = source.replace(
            "# ==========================================\n# Beta\n",
            "# ==========================================\n# Helpers\n# Shared.\n"
            "# ==========================================\n\n"
            "def _shared():\n    return 1\n\n\n"
            "# ==========================================\n# Beta\n")
        source = source.replace("return size + _SECRET", "return size + _SECRET + _shared()")
        source = source.replace("return _SECRET, os.sep", "return _SECRET, os.sep, _shared()")
        found = check(source, class_limit=50)
        self.assertEqual([v.rule for v in found if v.rule == "section-order"], [])
        self.assertEqual(sorted((v.rule, v.section, v.name) for v in found
                                if v.rule in ("private-name", "forward-reference")),
                         [("forward-reference", "Alpha", "_shared"),
                          ("forward-reference", "Alpha", "later"),
                          ("private-name", "Alpha", "_shared"),
                          ("private-name", "Beta", "_SECRET")])

    def test_baseline_format_round_trips(self):
        text = baseline_text(self.found)
        self.assertEqual(eval("{" + text + "}"), {v.key for v in self.found})


if __name__ == "__main__":
    if sys.argv[1:] == ["--print-baseline"]:
        print("KNOWN_VIOLATIONS = {")
        print(baseline_text(nexo_violations()), end="")
        print("}")
    elif sys.argv[1:] == ["--list"]:
        for v in nexo_violations():
            print(v)
    else:
        unittest.main()
