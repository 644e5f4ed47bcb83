"""Packaging: every folder of package data is declared (setuptools warns about each one that is not), and every
dependency range has an upper bound that .ci/constraints.txt (what CI installs) satisfies."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_resource_folder_is_a_declared_package():
    resources = ROOT / "mla_registry" / "resources"
    folders = {"mla_registry." + p.relative_to(ROOT / "mla_registry").as_posix().replace("/", ".")
               for p in [resources, *resources.rglob("*")] if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(PYPROJECT["tool"]["setuptools"]["packages"])


def _pins() -> dict[str, str]:
    lines = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    return {n.lower().replace("_", "-"): v for n, v in (ln.split("==") for ln in lines if "==" in ln)}


def test_every_range_is_bounded_and_ci_runs_its_upper_bound():
    from packaging.requirements import Requirement

    project = PYPROJECT["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for text in reqs:
        req = Requirement(text)
        ops = {s.operator for s in req.specifier}
        assert ops & {"<=", "=="}, f"{text}: no upper bound (the newest version CI ran)"
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{text}: not pinned in .ci/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{text}: CI installs {name}=={pins[name]}"
        upper = [s.version for s in req.specifier if s.operator in ("<=", "==")]
        assert re.sub(r"\+.*", "", pins[name]) in upper, f"{text}: upper bound is not what CI runs ({pins[name]})"
