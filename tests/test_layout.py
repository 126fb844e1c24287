"""chatctl.py reads like a book: its sections come in dependency order, as its table of contents says.

A section may use the module-level names of the sections before it and its own, never a later
section's: the server does not reach into a client, the core names no protocol but its own.
"""

from __future__ import annotations

import ast
import re
import symtable

from conftest import ROOT

SOURCE = (ROOT / "chatctl.py").read_text(encoding="utf-8")
BANNER = re.compile(r"^# (\d+)\. (.+)$")


def sections() -> list[tuple[int, str, int]]:
    """(number, title, first line) of each banner, in file order."""
    found = []
    lines = SOURCE.splitlines()
    for i, line in enumerate(lines, start=1):
        match = BANNER.match(line)
        if match and i > 1 and lines[i - 2].startswith("# ====="):
            found.append((int(match.group(1)), match.group(2).strip(), i))
    return found


def section_of(line: int, banners: list[tuple[int, str, int]]) -> int:
    number = 0
    for n, _, first in banners:
        if first <= line:
            number = n
    return number


def top_level_names(tree: ast.Module) -> dict[str, int]:
    """Each module-level name and the line that defines it (the first definition)."""
    defined: dict[str, int] = {}
    for node in tree.body:
        targets: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                targets += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for name in targets:
            defined.setdefault(name, node.lineno)
    return defined


def module_level_uses(node: ast.AST) -> list[tuple[str, int]]:
    """Names a module-level statement loads as it runs (not inside the functions, lambdas and class
    bodies it makes: symtable tells which of their names are the module's)."""
    found: list[tuple[str, int]] = []

    def visit(n: ast.AST) -> None:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for part in (*n.decorator_list, *n.args.defaults, *filter(None, n.args.kw_defaults)):
                visit(part)
            return
        if isinstance(n, ast.ClassDef):
            for part in (*n.decorator_list, *n.bases, *(k.value for k in n.keywords)):
                visit(part)
            return
        if isinstance(n, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            found.append((n.id, n.lineno))
        for child in ast.iter_child_nodes(n):
            visit(child)

    visit(node)
    return found


def scope_uses(table: symtable.SymbolTable) -> list[tuple[str, int]]:
    """The module's names used in each function, lambda, comprehension and class body below
    ``table``, with the line each scope starts on."""
    found = []
    for child in table.get_children():
        line = child.get_lineno()
        found += [(sym.get_name(), line) for sym in child.get_symbols()
                  if sym.is_referenced() and sym.is_global() and not sym.is_assigned()]
        found += scope_uses(child)
    return found


def test_the_table_of_contents_matches_the_banners():
    banners = sections()
    docstring = ast.get_docstring(ast.parse(SOURCE)) or ""
    docstring = docstring.partition("Contents")[2].partition("Threads and locks")[0]  # the table alone
    entry = re.compile(r"^\s+(\d+)\. (\S.*?)(?:\s{2,}|$)", re.MULTILINE)  # "  8. Server    what it holds"
    listed = [(int(m.group(1)), m.group(2)) for m in entry.finditer(docstring)]
    assert [n for n, _, _ in banners] == list(range(1, len(banners) + 1))
    assert [(n, title) for n, title, _ in banners] == listed, (banners, listed)


def test_each_section_uses_only_names_from_sections_before_it():
    tree = ast.parse(SOURCE)
    banners = sections()
    defined = top_level_names(tree)
    home = {name: section_of(line, banners) for name, line in defined.items()}
    titles = {n: title for n, title, _ in banners}
    used = [use for node in tree.body for use in module_level_uses(node)]
    used += scope_uses(symtable.symtable(SOURCE, "chatctl.py", "exec"))
    offences = []
    for name, line in used:
        where, source = section_of(line, banners), home.get(name)
        if source is not None and source > where:
            offences.append(f"line {line}: section {where} ({titles.get(where)}) uses {name} "
                            f"from section {source} ({titles[source]})")
    assert not offences, "\n".join(sorted(set(offences)))


def test_the_threads_table_names_every_thread_chatctl_starts():
    docstring = ast.get_docstring(ast.parse(SOURCE)) or ""
    table = docstring.partition("Threads and locks")[2]
    started = set(re.findall(r'"(chatctl-[a-z]+(?:-[a-z]+)*)', SOURCE)) - {"chatctl-web"}
    started |= {"chatctl-reader-N"}
    started.discard("chatctl-reader")
    missing = [name for name in sorted(started) if name not in table
               and not (name.startswith("chatctl-bus-") and "chatctl-bus-publish" in table)]
    assert not missing, missing
