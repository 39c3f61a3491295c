"""The package's public names, loaded on first use (``__init__.py``): each
one ``__all__`` lists is importable from the package, is the object its module
defines, and is what a type checker sees (the TYPE_CHECKING imports)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import sqlalchemy_envelope
from sqlalchemy_envelope import __all__ as exported

INIT = Path(sqlalchemy_envelope.__file__)


def test_every_exported_name_is_its_module_s_object() -> None:
    for name in exported:
        module_name = sqlalchemy_envelope._MODULES[name]
        module = importlib.import_module(module_name, "sqlalchemy_envelope")
        assert getattr(sqlalchemy_envelope, name) is getattr(module, name), name


def test_the_names_a_type_checker_sees_are_the_exported_ones() -> None:
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    checked = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for statement in node.body
        if isinstance(statement, ast.ImportFrom)
        for alias in statement.names
    }
    assert checked == set(exported) == set(sqlalchemy_envelope._MODULES)


def test_star_import_and_unknown_names() -> None:
    code = (
        "from sqlalchemy_envelope import *\n"
        "import sqlalchemy_envelope as e\n"
        "assert EncryptedType.__module__ == 'sqlalchemy_envelope'\n"
        "assert KeyRegistry is e.registry.KeyRegistry\n"
        "try:\n    e.NoSuchName\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('an unknown name resolved')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
