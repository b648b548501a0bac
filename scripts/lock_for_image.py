"""Print requirements.lock less the packages this interpreter already has: the pins for what installing
lora-serving adds to an image that brings its own stack (Dockerfile.lmi: the LMI image's torch, triton,
transformers, peft, ... were chosen together with its vLLM, so they stay as the image has them).

    python scripts/lock_for_image.py [requirements.lock] > added.lock
    PIP_CONSTRAINT=added.lock python -m pip install .

An image package outside pyproject.toml's ranges is still replaced by pip, at the newest version the range
allows; the LMI section of docs/SERVER.md says which ranges reach the LMI image's own versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from pathlib import Path


def normalized(name: str) -> str:
    """A distribution name as pip compares it (PEP 503): case, '-', '_' and '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lock", nargs="?", type=Path, default=Path("requirements.lock"))
    lock = parser.parse_args().lock
    installed = {normalized(distribution.metadata["Name"]) for distribution in importlib.metadata.distributions()}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#") and normalized(line.split("==")[0]) not in installed:
            print(line)


if __name__ == "__main__":
    main()
