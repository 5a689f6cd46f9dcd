"""Print pip pins at the lowest versions pyproject.toml allows for the libraries whose APIs the engine calls.

CI installs these and runs the engine tests on them, so each floor in pyproject is one that was seen passing
(pip has no "lowest versions" resolver; uv's --resolution=lowest would pin every transitive package too).
"""
import re
import sys
import tomllib
from pathlib import Path

FLOORED = ("diffusers", "transformers", "accelerate")  # torch: the pinned CPU build CI installs

dependencies = tomllib.loads(Path(sys.argv[1]).read_text())["project"]["dependencies"]
for requirement in dependencies:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)(,.*)?", requirement)
    if match and match.group(1) in FLOORED:
        print(f"{match.group(1)}=={match.group(2)}")
