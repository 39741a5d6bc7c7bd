"""Helpers shared by the benchmarks: machine description and BENCHMARKS.md section updates."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# VQ3D_BENCHMARKS_MD redirects the tables (e.g. for a quick dry run that must not touch the real file)
BENCHMARKS_MD = Path(os.environ.get("VQ3D_BENCHMARKS_MD", REPO / "BENCHMARKS.md"))
BIN = Path(sys.executable).parent


def machine() -> str:
    """One line: CPU model, cores, memory, torch version."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, no GPU used"


def git_revision() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it (the figures then come
    from code no commit holds)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}-dirty" if head and changed else head or "unknown"


def _section_pattern(name: str) -> "re.Pattern[str]":
    return re.compile(re.escape(f"<!-- {name} -->") + r"(.*?)" + re.escape(f"<!-- /{name} -->"), re.S)


def read_section(name: str) -> str:
    """The published body of BENCHMARKS.md's section ``name`` ('' when there is none)."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    match = _section_pattern(name).search(text)
    return match.group(1) if match else ""


def update_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers in BENCHMARKS.md."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = _section_pattern(name)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore"
    return env
