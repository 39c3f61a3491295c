"""The package as it would be published: `python -m build` makes an sdist
and a wheel that `twine check --strict` accepts, and the wheel, installed into
a fresh virtualenv (not the editable checkout), runs the quickstart and the
command line."""

from __future__ import annotations

import email.message
import email.parser
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trove_classifiers

import sqlalchemy_envelope

ROOT = Path(__file__).resolve().parent.parent
# What the sdist holds besides the package: the documents the tests read,
# the suite, the examples, the benchmarks and the docs, all of each folder.
SDIST_FILES = ["README.md", "FORMAT.md", "SECURITY.md", "CHANGELOG.md", "LICENSE"]
SDIST_FOLDERS = [
    "sqlalchemy_envelope",
    "alembic_templates",
    "tests",
    "examples",
    "benchmarks",
    "docs",
    "scripts",
    "interop",
]
# Only the user's environment reaches the fresh virtualenv's programs: no
# PYTHONPATH, no checkout on the path.
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The sdist and the wheel `python -m build` makes (the wheel from the sdist)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    yield out
    shutil.rmtree(out)


def _one(dist: Path, pattern: str) -> Path:
    (found,) = dist.glob(pattern)
    return found


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_twine_accepts_both(dist: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, sorted(dist.iterdir()))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2


def test_metadata(dist: Path) -> None:
    """The version is `__version__`, the changelog has its section, and every
    classifier is one PyPI accepts."""
    metadata = _wheel_metadata(_one(dist, "*.whl"))
    version = sqlalchemy_envelope.__version__
    assert metadata["Version"] == version
    assert _one(dist, "*.tar.gz").name == f"sqlalchemy_envelope-{version}.tar.gz"
    assert f"\n## [{version}] - " in (ROOT / "CHANGELOG.md").read_text()
    classifiers = metadata.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    assert set(classifiers) <= trove_classifiers.classifiers
    assert not set(classifiers) & trove_classifiers.deprecated_classifiers.keys()
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata["Description"] or metadata.get_payload()


def test_wheel_contents(dist: Path) -> None:
    """The wheel is the package, typed, with its Alembic templates, and nothing else."""
    with zipfile.ZipFile(_one(dist, "*.whl")) as archive:
        names = archive.namelist()
    assert "sqlalchemy_envelope/py.typed" in names
    assert "sqlalchemy_envelope/alembic_templates/envelope/env.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sqlalchemy_envelope"}
    package = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "sqlalchemy_envelope").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert package <= set(names)


def test_sdist_contents(dist: Path) -> None:
    """The sdist is the project: its tests run from it, `scripts/test` included
    and still executable."""
    sdist = _one(dist, "*.tar.gz")
    prefix = sdist.name.removesuffix(".tar.gz") + "/"
    with tarfile.open(sdist) as archive:
        members = {m.name.removeprefix(prefix): m for m in archive.getmembers()}
    expected = set(SDIST_FILES)
    for folder in SDIST_FOLDERS:
        for path in (ROOT / folder).rglob("*"):
            ignored = {"__pycache__", "node_modules"} & set(path.parts)
            if path.is_file() and not ignored and path.suffix != ".db":
                expected.add(str(path.relative_to(ROOT)))
    assert expected <= members.keys(), sorted(expected - members.keys())
    assert members["scripts/test"].mode & 0o111
    assert not [n for n in members if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    """The README's quickstart and the command line, from the wheel alone."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    wheel = str(_one(dist, "*.whl"))

    def run(*args: str) -> str:
        result = subprocess.run(
            args, capture_output=True, text=True, cwd=tmp_path, env=CLEAN_ENV, timeout=600
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    run(python, "-m", "pip", "install", "-q", wheel)
    where = run(python, "-c", "import sqlalchemy_envelope as m; print(m.__file__, m.__version__)")
    assert where.startswith(str(env_dir / "lib"))
    assert where.split()[1] == sqlalchemy_envelope.__version__

    shutil.copy(ROOT / "examples" / "quickstart.py", tmp_path)
    out = run(python, "quickstart.py", str(tmp_path / "q.db"))
    assert "what the application reads: Ada Lovelace" in out
    assert "active version 2" in out

    run(python, "-m", "pip", "install", "-q", f"{wheel}[cli]")
    helped = run(str(env_dir / "bin" / "sqlalchemy-envelope"), "--help")
    assert "rotate" in helped
    assert "reencrypt" in helped
