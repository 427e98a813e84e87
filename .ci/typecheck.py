"""Run mypy on the package as Python imports it (``headmaster.client``, ``headmaster.server``, ...).

The checkout's top-level folders become ``headmaster.*`` through pyproject's ``package-dir`` table,
and the editable install maps them with an import hook, which mypy cannot follow. So this script
mirrors the package as symlinks under ``build/typecheck/headmaster`` (``build/`` is ignored) and runs
mypy there with the ``[tool.mypy]`` settings of pyproject.toml (what to check, how strictly).
Arguments are passed to mypy. Usage: ``python .ci/typecheck.py`` (``make lint`` runs it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mypy itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def mirror() -> None:
    """build/typecheck/<package path> -> the folder setuptools maps it to, one symlink per folder."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = TREE / "headmaster"
    top.mkdir(parents=True, exist_ok=True)
    for package, folder in package_dir.items():
        if package == "headmaster":  # its own modules, file by file (the sub-packages go in beside them)
            links = {top / p.name: p for p in (ROOT / folder).glob("*.py")}
        else:
            links = {TREE.joinpath(*package.split(".")): ROOT / folder}
        for link, target in links.items():
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target)


if __name__ == "__main__":
    mirror()
    sys.exit(
        subprocess.call(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *sys.argv[1:]], cwd=ROOT
        )
    )
