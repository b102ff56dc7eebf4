"""Dependency floors admit no release with a known CVE on our paths, and CI installs one pinned
stack (requirements.lock) that satisfies them. The CVE record is pyproject.toml's
[tool.aigc-ray.security-floors]; these tests hold the declared floors and the pins to it."""

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return {r.name.lower(): r for r in reqs}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_every_dependency_has_a_floor():
    """`pip install -e .` outside CI resolves from the floors: an unbounded one could pick any old release."""
    unbounded = [str(r) for r in _requirements().values() if not any(s.operator in (">=", "==", "~=") for s in r.specifier)]
    assert not unbounded, f"no lower bound: {unbounded}"


def test_floors_and_pins_exclude_releases_with_known_cves():
    reqs, pins = _requirements(), _pins()
    floors = PYPROJECT["tool"]["aigc-ray"]["security-floors"]
    assert floors, "the CVE record is empty"
    for name, record in floors.items():
        safe = Version(record["first_safe"])
        assert name in reqs, f"{name} has a security floor but is not a declared dependency"
        lowest = min(Version(s.version) for s in reqs[name].specifier if s.operator in (">=", "==", "~="))
        assert lowest >= safe, f"{name}: {reqs[name].specifier} admits releases before {safe} ({record['why']})"
        assert Version(pins[name]) >= safe, f"requirements.lock pins {name}=={pins[name]}, before {safe}"


def test_ci_installs_the_lock_file_which_satisfies_every_declared_requirement():
    pins = _pins()
    for name, req in _requirements().items():
        assert name in pins, f"{name} is not pinned in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, not {req}"
    assert "aigc-ray" not in pins
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-r requirements.lock" in ci and "--no-deps -e ." in ci
