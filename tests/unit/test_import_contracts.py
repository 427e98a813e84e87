"""The import contracts between the package's rooms, checked on every import statement.

import-linter cannot see this package: its rooms are top-level folders that pyproject's
``package-dir`` assembles into one ``headmaster`` namespace at install time, and grimp walks one
folder per package. So the contracts are read here from the source with ``ast`` (imports inside
functions included: about half of the package's are), through the same folder map pyproject
gives setuptools.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]

# Higher rooms may import lower ones, never the reverse; rooms on one line are peers. The head
# lifecycle drives the server and changes the repository; the server reads the repository's
# topology; the repository renders exported cards and copies the served models.
LAYERS = [
    ["cli"],
    ["pipelines"],
    ["training"],
    ["lifecycle"],
    ["server"],
    ["repository"],
    ["export"],
    ["store"],
    ["client"],
    ["served"],
    ["rules"],
    ["errors", "images", "texts"],
]
# Code that runs elsewhere imports nothing else of the package but what it takes with it: the
# client ships to apps on its own; the served models run inside Triton's Python stub from a copy
# in each model repository, with the rule kernel copied beside them (repository/layout.py,
# copy_backend), so the kernel imports nothing of the package either.
SELF_CONTAINED = {
    "headmaster.client": [],
    "headmaster.served": ["headmaster.rules"],
    "headmaster.rules": [],
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. headmaster.cli.serve
    target: str  # what it imports, e.g. headmaster.server.live
    where: str  # file:line


def _folders() -> dict[str, Path]:
    """headmaster.X -> the folder pyproject maps it to."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package: ROOT / folder for package, folder in setuptools["package-dir"].items()}


def _imports() -> list[Import]:
    found = []
    for package, folder in _folders().items():
        # headmaster's own folder holds only its top-level modules; the other rooms, all below them.
        files = folder.glob("*.py") if package == "headmaster" else folder.rglob("*.py")
        for path in files:
            if ".venv" in path.parts:
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            module = ".".join((package, *parts)).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module == "headmaster":  # from headmaster import errors
                    targets = [f"headmaster.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module]
                elif isinstance(node, ast.ImportFrom):  # relative: resolved against the module's package
                    base = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found += [Import(module, t, where) for t in targets if t == "headmaster" or t.startswith("headmaster.")]
    return found


IMPORTS = _imports()


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_the_scan_sees_the_whole_package():
    """A scan that found nothing would pass every contract: it must see every room import."""
    rooms = {_room(i.module) for i in IMPORTS}
    assert {"cli", "pipelines", "training", "export", "lifecycle", "server", "repository", "served", "store"} <= rooms
    assert len(IMPORTS) > 300


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("package", SELF_CONTAINED)
def test_code_that_runs_elsewhere_imports_nothing_else_of_the_package(package):
    allowed = [package, *SELF_CONTAINED[package]]
    leaks = [
        f"{i.where}: {i.module} imports {i.target}"
        for i in IMPORTS
        if _within(i.module, package) and not any(_within(i.target, a) for a in allowed)
    ]
    assert leaks == [], f"{package} may import only {allowed} of headmaster:\n" + "\n".join(leaks)


def test_rooms_import_only_downwards():
    level = {room: n for n, rooms in enumerate(LAYERS) for room in rooms}
    unknown = sorted({_room(i.module) for i in IMPORTS} - set(level))
    assert unknown == [], f"rooms missing from LAYERS (put each at its level): {unknown}"
    upward = [
        f"{i.where}: {i.module} ({_room(i.module)}) imports {i.target} ({_room(i.target)}), a room above it"
        for i in IMPORTS
        if _room(i.target) in level and level[_room(i.target)] < level[_room(i.module)]
    ]
    assert upward == [], "imports against the layers:\n" + "\n".join(upward)
