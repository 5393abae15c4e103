"""kdforge installs beside an existing stack: pyproject declares ranges; the README's commands install exact pins."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_dependencies_are_ranges_and_the_makefile_installs_the_tested_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = [d for d in deps if "==" in d]
    assert pinned == [], f"hard pins replace a user's stack: {pinned}"
    ranges = {re.split(r"[<>=]", d)[0]: d for d in deps}
    for name in ("torch", "transformers", "accelerate"):
        assert "<" in ranges[name] and ">=" in ranges[name]
    constraints = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                       if line and not line.startswith("#"))
    assert constraints["torch"] == "2.13.0"  # the CPU build on this machine's disk
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    from importlib.metadata import version

    for name, pin in constraints.items():  # the suite runs on exactly what the constraints say
        assert version(name).split("+")[0] == pin
