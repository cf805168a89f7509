"""Checkpoint directory: everything needed to resume training exactly or to generate.

    <dir>/model.pt          model + optimizer state, step, RNG states, loss history, configs
    <dir>/tables.npz        Engram rows and their row-wise Adam state (in-process tables)
    <dir>/tables.json       or: the memory service address and table name holding them
    <dir>/compression.npy   the compression map the tables were trained with
    <dir>/tokenizer.json    the tokenizer
    <dir>/config.json       model and train configs, human-readable

Written to a temporary directory and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from memory_service.spec import EngramSpec
from model_worker.model import ModelConfig, MoEConfig

MODEL_FILE = "model.pt"
TABLES_FILE = "tables.npz"
REMOTE_TABLES_FILE = "tables.json"  # instead of tables.npz when the rows live on the memory service
COMPRESSION_FILE = "compression.npy"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"


def model_config_to_dict(config: ModelConfig) -> dict:
    """Plain dict of a ModelConfig (the Engram spec as its JSON fields)."""
    data = dataclasses.asdict(config)
    data["engram"] = json.loads(config.engram.to_json()) if config.engram is not None else None
    return data


def model_config_from_dict(data: dict) -> ModelConfig:
    """Inverse of model_config_to_dict."""
    data = dict(data)
    data["moe"] = MoEConfig(**data["moe"])
    data["engram"] = EngramSpec.from_dict(data["engram"]) if data.get("engram") is not None else None
    return ModelConfig(**data)


def begin_write(directory: Path) -> Path:
    """A fresh temporary directory beside `directory` to write a checkpoint into."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_write(tmp: Path, directory: Path) -> None:
    """Replace `directory` by the completed temporary one."""
    old = directory.with_name(directory.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def remote_tables(directory: Path) -> dict | None:
    """{"memory", "table", "version"} of a checkpoint whose rows stay on the memory service (None: rows saved here)."""
    path = Path(directory) / REMOTE_TABLES_FILE
    if not path.is_file():
        return None
    where = json.loads(path.read_text())
    where.setdefault("version", 0)
    return where


def tables_location(directory: Path, memory: str | None = None) -> tuple[str | None, str | None, int]:
    """(memory, table, version) of a checkpoint's rows: where it says they are, or on `memory` (a --memory value
    overriding it) under the table name it trained (default engram-<preset>); (None, None, 0): saved in it."""
    where = remote_tables(directory) or {"memory": None, "table": None, "version": 0}
    memory = memory or where["memory"]
    if not memory:
        return None, None, 0
    trained = json.loads((Path(directory) / CONFIG_FILE).read_text())["train"]
    return memory, where["table"] or trained.get("table") or f"engram-{trained['preset']}", where["version"]


def require_checkpoint(directory: str | Path) -> Path:
    """The checkpoint directory, or FileNotFoundError saying what is missing."""
    directory = Path(directory)
    missing = [f for f in (MODEL_FILE, COMPRESSION_FILE, TOKENIZER_FILE) if not (directory / f).is_file()]
    if not (directory / TABLES_FILE).is_file() and not (directory / REMOTE_TABLES_FILE).is_file():
        missing.append(TABLES_FILE)
    if missing:
        raise FileNotFoundError(f"{directory} is not a complete checkpoint: missing {missing} (train first: engram train)")
    return directory
