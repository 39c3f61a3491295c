"""The package's modules keep to themselves: none uses another's private members.

A private (``_name``, not a dunder) belongs to the module that defines it, at
module level or in one of its classes. Another module reaching for it, as
``x._name`` or ``from .m import _name``, couples to what its owner may change
at will. Privates no module of the package defines (SQLAlchemy's, the standard
library's) are not this test's matter. The import layers are checked by
import-linter (``[tool.importlinter]`` in pyproject.toml).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy_envelope

PACKAGE = Path(sqlalchemy_envelope.__file__).parent
ROOT = PACKAGE.parent

# The first parameter of a method: the object or class whose members it may use.
OWN_NAMES = frozenset({"self", "cls"})


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def package_modules() -> list[Module]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules.append(Module(name, path, ast.parse(path.read_text(), str(path))))
    return modules


def bound_names(node: ast.stmt) -> Iterator[str]:
    """The names a statement of a class body defines."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield node.name
    elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    yield name.id


def member_privates(module: Module) -> set[str]:
    """The private members of a module's classes: defined in the class body,
    listed in ``__slots__``, or set on ``self``."""
    names: set[str] = set()
    for cls in ast.walk(module.tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            names.update(bound_names(node))
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
                and isinstance(node.value, ast.Tuple | ast.List)
            ):
                names.update(
                    e.value
                    for e in node.value.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                )
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in OWN_NAMES
            ):
                names.add(node.attr)
    return {name for name in names if is_private(name)}


def imported_from(module: Module, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` statement reads."""
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def module_aliases(module: Module, names: set[str]) -> dict[str, str]:
    """Local names bound to modules of the package (``from . import census``)."""
    aliases = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            source = imported_from(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in names:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in names:
                    aliases[alias.asname] = alias.name
    return aliases


def private_uses(module: Module) -> Iterator[tuple[ast.expr, ast.expr, str]]:
    """Each use of a private member: (node, the object it is read on, name)."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            yield node, node.value, node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
        ):
            yield node, node.args[0], node.args[1].value


def violations() -> list[str]:
    modules = package_modules()
    names = {m.name for m in modules}
    # Which modules' classes have a private member of each name.
    owners: dict[str, set[str]] = {}
    for m in modules:
        for name in member_privates(m):
            owners.setdefault(name, set()).add(m.name)

    found: list[tuple[Path, int, str]] = []
    for m in modules:
        where = m.path.relative_to(ROOT)
        own_classes = {
            node.name for node in ast.walk(m.tree) if isinstance(node, ast.ClassDef)
        } | OWN_NAMES
        aliases = module_aliases(m, names)
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom):
                source = imported_from(m, node)
                if source in names and source != m.name:
                    found.extend(
                        (where, node.lineno, f"imports {alias.name} from {source}")
                        for alias in node.names
                        if is_private(alias.name)
                    )
        for node, target, attr in private_uses(m):
            if isinstance(target, ast.Name) and target.id in aliases:
                # module._name: the owner is known exactly.
                owner = {aliases[target.id]} - {m.name}
            elif (isinstance(target, ast.Name) and target.id in own_classes) or (
                isinstance(target, ast.Call)
                and isinstance(target.func, ast.Name)
                and target.func.id == "super"
            ):
                continue
            elif m.name in owners.get(attr, set()):
                # A name this module defines too: taken as its own (an
                # ``other._name`` of its own class, in __eq__ and the like).
                continue
            else:
                owner = owners.get(attr, set())
            if owner:
                found.append((where, node.lineno, f"uses {attr} of {', '.join(sorted(owner))}"))
    return [f"{where}:{line}: {what}" for where, line, what in sorted(found)]


def test_no_module_uses_another_modules_privates() -> None:
    found = violations()
    assert not found, "private members used outside their module:\n" + "\n".join(found)
