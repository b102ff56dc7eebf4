"""Dependency floors admit no release with a known CVE on our paths, and CI installs one pinned
stack (requirements.lock) that satisfies them."""

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# the first release of each without the known CVEs we care about
SAFE_FLOORS = {"torch": "2.10", "torchvision": "0.25", "protobuf": "6.33.5", "grpcio": "1.68.1",
               "grpcio-health-checking": "1.68.1", "fastapi": "0.133", "starlette": "0.49.1", "pillow": "11.3",
               "tqdm": "4.66.3"}


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return {r.name.lower(): r for r in reqs}


def test_floors_exclude_releases_with_known_cves():
    reqs = _requirements()
    for name, safe in SAFE_FLOORS.items():
        assert name in reqs, f"{name} is used but not a declared dependency"
        floors = [Version(s.version) for s in reqs[name].specifier if s.operator in (">=", "==")]
        assert floors and min(floors) >= Version(safe), f"{name}: {reqs[name].specifier} admits releases before {safe}"


def test_ci_installs_the_lock_file_which_satisfies_every_declared_requirement():
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for name, req in _requirements().items():
        assert name in pins, f"{name} is not pinned in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, not {req}"
    assert "aigc-ray" not in pins
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -r requirements.lock" in ci and "--no-deps -e ." in ci
