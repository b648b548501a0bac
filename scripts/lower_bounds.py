"""Print pip constraints that hold every dependency pyproject.toml names at its lower bound.

    python scripts/lower_bounds.py [pyproject.toml]

Covers the build requirement, the dependencies, every optional extra and the files scripts/setup --test
installs without dependencies: `name>=X` becomes `name==X` (extras dropped: pip refuses them in
constraints). A requirement without a lower bound is left out, and said so on stderr. `scripts/lock --lowest`
installs with these and runs the suite: that is how the lower bounds in pyproject.toml are tested.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

from lock_for_image import normalized

REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(?P<specifiers>[^;]*)")


def requirements(pyproject: dict) -> list[str]:
    project = pyproject["project"]
    found = list(pyproject["build-system"]["requires"]) + list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        found += extra
    found += pyproject.get("tool", {}).get("lora-serving", {}).get("test-files", [])
    return found


def lower_bounds(requirement_strings: list[str]) -> tuple[dict[str, str], list[str]]:
    bounds: dict[str, str] = {}
    unbounded = []
    for text in requirement_strings:
        match = REQUIREMENT.match(text)
        name = normalized(match.group("name"))
        lower = [spec.strip()[2:].strip() for spec in match.group("specifiers").split(",")
                 if spec.strip().startswith(">=")]
        if not lower:
            unbounded.append(text)
            continue
        if bounds.get(name, lower[0]) != lower[0]:
            raise SystemExit(f"{name} has two lower bounds in pyproject.toml: {bounds[name]} and {lower[0]}")
        bounds[name] = lower[0]
    return bounds, unbounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pyproject", nargs="?", type=Path, default=Path("pyproject.toml"))
    path = parser.parse_args().pyproject
    bounds, unbounded = lower_bounds(requirements(tomllib.loads(path.read_text())))
    for text in unbounded:
        print(f"lower_bounds.py: no lower bound, resolved to the newest: {text}", file=sys.stderr)
    for name, version in sorted(bounds.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
