"""gRPC definitions of the Engram memory service (package `engram.v1`).

The Python stubs (`engram_pb2.py`, `engram_pb2_grpc.py`) are generated from
`engram.proto` with grpcio-tools when the project is installed (setup.py's build step),
or by `python -m protos` after editing the .proto; they are never committed, and
importing this package never generates them: stubs older than the .proto give one
warning, missing stubs an ImportError that says what to run.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("engram.proto",)


def _stale(proto: Path) -> bool:
    outputs = [proto.with_name(proto.stem + "_pb2.py"), proto.with_name(proto.stem + "_pb2_grpc.py")]
    return any(not o.exists() or o.stat().st_mtime < proto.stat().st_mtime for o in outputs)


def generate(out_dir: str | os.PathLike | None = None, force: bool = False) -> list[Path]:
    """Run grpc_tools.protoc on every .proto here; outputs land in out_dir/protos (default: beside the protos)."""
    from grpc_tools import protoc

    root = PROTO_DIR.parent
    target_root = Path(out_dir) if out_dir is not None else root
    written = []
    for name in PROTO_FILES:
        proto = PROTO_DIR / name
        if not force and out_dir is None and not _stale(proto):
            continue
        (target_root / "protos").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target_root / "protos") as tmp:
            include = Path(protoc.__file__).parent / "_proto"
            rc = protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{include}",
                              f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"protos/{name}"])
            if rc != 0:
                raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
            for produced in (Path(tmp) / "protos").glob("*.py"):
                final = target_root / "protos" / produced.name
                os.replace(produced, final)  # atomic: concurrent importers never see half a file
                written.append(final)
    return written


_FIX = "run `python -m protos` (or reinstall: pip install -e .)"


def __getattr__(name: str):
    """Missing generated stubs: an ImportError that says how to make them (present ones import normally)."""
    if name.endswith(("_pb2", "_pb2_grpc")) and not (PROTO_DIR / f"{name}.py").exists():
        raise ImportError(f"protos/{name}.py has not been generated from the .proto: {_FIX}")
    raise AttributeError(name)


if any(_stale(PROTO_DIR / name) for name in PROTO_FILES):
    warnings.warn(f"the gRPC stubs in {PROTO_DIR} are older than their .proto: {_FIX}", stacklevel=2)
