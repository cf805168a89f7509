"""Compile memory_service/fastpath.c into a shared library beside it (no numpy, no Python API).

Used by setup.py's build step (pip install) and by `python -m memory_service.native_build`
(after editing the kernel in a source checkout). Never run at import time.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("fastpath.c")
LIBRARY = SOURCE.with_name("_fastpath" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def compiler() -> list[str] | None:
    """The C compiler command ($CC, else cc/gcc/clang on PATH), or None."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def stale() -> bool:
    """Whether the library is missing or older than fastpath.c."""
    return not LIBRARY.exists() or LIBRARY.stat().st_mtime < SOURCE.stat().st_mtime


def build(force: bool = False) -> Path:
    """Compile fastpath.c (when stale, or always with force); returns the library path.

    Writes a temporary file and renames it, so processes that build at once (Ray workers
    importing the same tree) never load a half-written library. Raises RuntimeError when
    there is no compiler or compilation fails.
    """
    if not force and not stale():
        return LIBRARY
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install cc/gcc/clang)")
    fd, tmp = tempfile.mkstemp(prefix="._fastpath-", suffix=".so", dir=LIBRARY.parent)
    os.close(fd)
    try:
        result = subprocess.run([*cc, "-O3", "-shared", "-fPIC", "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {result.stderr.strip()}")
        os.replace(tmp, LIBRARY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return LIBRARY


if __name__ == "__main__":
    print(build(force=True))
