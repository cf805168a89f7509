"""Table files: import rows from the reference layout, .npy or safetensors; export to .npy or safetensors.

The reference keeps one Engram module per layer, whose table is the state-dict entry
`multi_head_embedding.embedding.weight` [rows, head_dim]; a torch checkpoint of that
module (or of a model holding it under some prefix) imports directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.row_dtypes import BFLOAT16, is_floating
from memory_service.safetensors_io import read_header, read_into

REFERENCE_KEY = "multi_head_embedding.embedding.weight"


def _pick(tensors: dict, key: str | None, path: Path):
    if key is not None:
        if key not in tensors:
            raise InvalidArgument(f"{path} has no tensor {key!r}; it has {sorted(tensors)[:20]}")
        return tensors[key]
    matches = [k for k in tensors if k == REFERENCE_KEY or k.endswith("." + REFERENCE_KEY)]
    if len(matches) == 1:
        return tensors[matches[0]]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise InvalidArgument(f"{path} holds {len(tensors)} tensors ({sorted(tensors)[:10]}...); name one with --key")


class RowSource:
    """A table in a file, read a block of rows at a time: .shape, .dtype and rows[start:stop] -> np.ndarray."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, read_rows):
        self.shape, self.dtype, self._read_rows = tuple(shape), np.dtype(dtype), read_rows
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a RowSource reads contiguous row slices")
        start, stop, _ = rows.indices(self.shape[0])
        return self._read_rows(start, max(start, stop))

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def _torch_rows(tensor) -> np.ndarray:
    """A CPU tensor's values as numpy (bfloat16 as ml_dtypes' bfloat16, bit for bit)."""
    import torch

    tensor = tensor.detach().contiguous()
    return tensor.view(torch.int16).numpy().view(BFLOAT16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _npy_rows(path: Path) -> RowSource | None:
    """A 2-D C-order .npy read a block of rows at a time with plain reads (None for any other layout: then it is
    memory-mapped). Sequential reads get the kernel's readahead (measured here: 1.2 GB/s from a cold file); a
    memory map is faulted in a few pages at a time and read a cold 4 GiB file about 2x slower."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = header(f)
        offset = f.tell()
    if fortran_order or len(shape) != 2 or dtype.hasobject or not dtype.isnative:
        return None
    row_bytes = shape[1] * dtype.itemsize
    if path.stat().st_size < offset + shape[0] * row_bytes:
        raise InvalidArgument(f"{path} is {path.stat().st_size:,} bytes, shorter than the {shape[0]:,} x {shape[1]} "
                              f"{dtype.name} rows its header names")

    def read_rows(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, shape[1]), dtype=dtype)  # [stop - start, head_dim]
        return read_into(path, offset + start * row_bytes, out,
                         f"{path} ends before row {stop} of the {shape[0]:,} its header names")

    return RowSource(shape, dtype, read_rows)


def read_table_file(path: str | Path, key: str | None = None, mmap: bool = True) -> np.ndarray | RowSource:
    """Rows [rows, head_dim] from a .npy, .safetensors or torch (.pt/.pth/.bin) file, read lazily: a RowSource
    over a .npy (read a block at a time) or a safetensors tensor, or a memory-mapped torch checkpoint (so a file
    bigger than RAM imports a block at a time)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        rows = (_npy_rows(path) if mmap else None) or np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    elif suffix == ".safetensors":
        from safetensors import safe_open

        f8 = [name for name, entry in read_header(path).items() if entry.dtype.startswith("F8")]
        if f8 and (key in f8 or (key is None and len(f8) == len(read_header(path)))):
            raise InvalidArgument(f"{path} holds FP8 tensors ({f8[:4]}): import FP8 tables from their checkpoint "
                                  "directory with --checkpoint (codes and scales together)")

        with safe_open(str(path), framework="numpy") as f:
            name = _pick({k: k for k in f.keys()}, key, path)
            tensor = f.get_slice(name)
            shape, dtype = tensor.get_shape(), tensor[0:0].dtype if tensor.get_shape() else np.float32

        def read_rows(start: int, stop: int, name=name) -> np.ndarray:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_slice(name)[start:stop]

        rows = RowSource(shape, dtype, read_rows)
    elif suffix in (".pt", ".pth", ".bin"):
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:  # an old (non-zip) checkpoint cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if torch.is_tensor(state):
            rows = state
        elif isinstance(state, dict):
            rows = _pick({k: v for k, v in state.items() if torch.is_tensor(v)}, key, path)
        else:
            raise InvalidArgument(f"{path} is neither a tensor nor a state dict")
        if rows.ndim == 2:
            tensor = rows
            rows = RowSource(tuple(tensor.shape), _torch_rows(tensor[0:0]).dtype,
                             lambda start, stop: _torch_rows(tensor[start:stop]))
    else:
        raise InvalidArgument(f"unsupported table file {path.name}: use .npy, .safetensors or a torch .pt/.pth/.bin")
    if rows.ndim != 2:
        raise InvalidArgument(f"table in {path} must be 2-D [rows, head_dim], got shape {list(rows.shape)}")
    if not is_floating(rows.dtype):
        raise InvalidArgument(f"table in {path} must hold floating-point rows, got dtype {rows.dtype} (a bfloat16 .npy "
                              f"saves as opaque 2-byte voids: export float32 or use .safetensors)")
    return rows


def write_table_file(path: str | Path, layers: dict[int, np.ndarray]) -> None:
    """Write rows per layer: .npy (one layer; bfloat16 as float32) or .safetensors (keys 'layer.<id>', BF16 kept)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if len(layers) != 1:
            raise InvalidArgument(".npy holds one layer; pick --layer or use .safetensors")
        rows = next(iter(layers.values()))
        # .npy has no bfloat16 (numpy would write opaque 2-byte voids): bf16 rows widen to float32, exactly.
        np.save(path, rows.astype(np.float32) if rows.dtype == BFLOAT16 else rows, allow_pickle=False)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({f"layer.{layer}": np.ascontiguousarray(rows) for layer, rows in layers.items()}, str(path))
    else:
        raise InvalidArgument(f"unsupported export format {path.name}: use .npy or .safetensors")
