"""The Engram tables of a DeepSeek-V4.1-layout checkpoint: read from its safetensors shards, written back alike.

Per Engram layer L the shards hold (names as public loaders read them; the patterns are
configurable because they come from third-party code):

    layers.{L}.engram.embed.weight   F8_E4M3 [rows, head_dim]       codes
    layers.{L}.engram.embed.scale    F8_E8M0 [rows, head_dim / 32]  one power-of-two scale per 32 values

`model.safetensors.index.json` names the shard of every tensor (a checkpoint of one file,
`model.safetensors`, needs no index). A layer reads as FP8 records (fp8_rows.py), a block
of rows at a time: a RowSource the table import streams into a pool in bounded memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from memory_service import fp8_rows
from memory_service.errors import InvalidArgument
from memory_service.row_dtypes import FP8_BLOCK, FP8_BLOCK_SCALED, row_width
from memory_service.safetensors_io import TensorEntry, read_header, read_rows, write_file
from memory_service.table_io import RowSource

WEIGHT_PATTERN = "layers.{layer}.engram.embed.weight"
SCALE_PATTERN = "layers.{layer}.engram.embed.scale"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FILE = "engram-layer-{layer}.safetensors"


class EngramCheckpoint:
    """The Engram tensors of a checkpoint directory, found through its index."""

    def __init__(self, directory: str | Path, weight_pattern: str = WEIGHT_PATTERN, scale_pattern: str = SCALE_PATTERN):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.directory}")
        for pattern in (weight_pattern, scale_pattern):
            if "{layer}" not in pattern:
                raise InvalidArgument(f"a tensor name pattern needs '{{layer}}', got {pattern!r}")
        self.weight_pattern, self.scale_pattern = weight_pattern, scale_pattern
        self.weight_map = self._weight_map()
        self._headers: dict[str, dict[str, TensorEntry]] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise InvalidArgument(f"{index} is not a safetensors index (no weight_map: {e})") from None
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise InvalidArgument(f"{index}: weight_map must map tensor names to shard file names")
            return weight_map
        single = self.directory / SINGLE_FILE
        if single.is_file():
            return {name: SINGLE_FILE for name in read_header(single)}
        raise FileNotFoundError(f"{self.directory} has neither {INDEX_FILE} nor {SINGLE_FILE}")

    @property
    def config(self) -> dict | None:
        """The checkpoint's config.json, if it has one."""
        path = self.directory / CONFIG_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def entry(self, name: str) -> tuple[Path, TensorEntry]:
        """(shard path, entry) of a tensor named in the index."""
        if name not in self.weight_map:
            raise InvalidArgument(f"the checkpoint's index names no tensor {name!r} (set the name pattern: "
                                  f"--weight-pattern / --scale-pattern)")
        path = (self.directory / self.weight_map[name]).resolve()
        if not path.is_relative_to(self.directory.resolve()):
            raise InvalidArgument(f"the index puts {name!r} in {self.weight_map[name]!r}, outside the checkpoint directory")
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} named by the index for {name!r} is missing")
        if str(path) not in self._headers:
            self._headers[str(path)] = read_header(path)
        header = self._headers[str(path)]
        if name not in header:
            raise InvalidArgument(f"{path} has no tensor {name!r}, though the index says it does")
        return path, header[name]

    def layers(self) -> list[int]:
        """Layers with an Engram weight in the index."""
        prefix, suffix = self.weight_pattern.split("{layer}", 1)
        found = []
        for name in self.weight_map:
            middle = name[len(prefix):len(name) - len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
            if middle.isdigit():
                found.append(int(middle))
        return sorted(found)

    def layer(self, layer: int) -> RowSource:
        """FP8 records uint8 [rows, head_dim + head_dim / 32] of a layer, read a block of rows at a time."""
        weight_path, weight = self.entry(self.weight_pattern.format(layer=layer))
        scale_path, scale = self.entry(self.scale_pattern.format(layer=layer))
        if weight.dtype != "F8_E4M3" or len(weight.shape) != 2:
            raise InvalidArgument(f"{weight.name} is {weight.dtype} {list(weight.shape)}, expected F8_E4M3 [rows, head_dim]")
        rows, head_dim = weight.shape
        if head_dim % FP8_BLOCK or scale.dtype != "F8_E8M0" or scale.shape != (rows, head_dim // FP8_BLOCK):
            raise InvalidArgument(f"{scale.name} is {scale.dtype} {list(scale.shape)}, expected F8_E8M0 "
                                  f"[{rows}, {head_dim // FP8_BLOCK}] for {weight.name} [{rows}, {head_dim}]")
        width = row_width(FP8_BLOCK_SCALED, head_dim)

        def read(start: int, stop: int) -> np.ndarray:
            out = np.empty((stop - start, width), dtype=np.uint8)  # [n, head_dim + head_dim / 32]
            out[:, :head_dim] = read_rows(weight_path, weight, start, stop)
            out[:, head_dim:] = read_rows(scale_path, scale, start, stop)
            return out

        return RowSource((rows, width), np.uint8, read)


def export_layers(directory: str | Path, layers: dict[int, tuple[int, object]], head_dim: int,
                  weight_pattern: str = WEIGHT_PATTERN, scale_pattern: str = SCALE_PATTERN, metadata: dict | None = None,
                  progress=None) -> list[Path]:
    """Write layers {layer: (rows, read_records(start, stop) -> uint8 [n, record])} as a V4.1-layout checkpoint: one
    shard per layer holding its weight and scale tensors (each block of records read once), and the index naming
    them. Returns the shard paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, paths, total = {}, [], 0
    for layer, (rows, read_records) in sorted(layers.items()):
        weight, scale = weight_pattern.format(layer=layer), scale_pattern.format(layer=layer)
        tensors = {weight: ("F8_E4M3", (rows, head_dim)), scale: ("F8_E8M0", (rows, head_dim // FP8_BLOCK))}

        def block(start: int, stop: int, read_records=read_records, weight=weight, scale=scale) -> dict[str, np.ndarray]:
            codes, scales = fp8_rows.split(read_records(start, stop), head_dim)
            return {weight: codes, scale: scales}

        path = directory / EXPORT_FILE.format(layer=layer)
        write_file(path, tensors, block, metadata=metadata, progress=progress)
        weight_map.update({weight: path.name, scale: path.name})
        paths.append(path)
        total += rows * row_width(FP8_BLOCK_SCALED, head_dim)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths
