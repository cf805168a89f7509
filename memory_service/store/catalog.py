"""The catalog of a store: table metadata documents, table ids and compression maps (see layout.py)."""

from __future__ import annotations

import struct

import numpy as np

from memory_service.errors import NotFound, shown
from memory_service.store.layout import Databases, table_id_key
from memory_service.table_meta import META_PREFIX, TableMeta, meta_key

_NEXT_TABLE_ID = b"next_table_id"


class Catalog:
    """Reads and writes the `meta` and `maps` databases."""

    def __init__(self, dbs: Databases):
        self.dbs = dbs

    def read(self, txn, name: str) -> TableMeta:
        """A table's metadata inside a transaction (NotFound if absent)."""
        blob = txn.get(meta_key(name), db=self.dbs.meta)
        if blob is None:
            raise NotFound(f"no table named {shown(name)}", reason="TABLE_NOT_FOUND")
        return TableMeta.from_json(blob)

    def put(self, txn, meta: TableMeta) -> None:
        """Write a table's metadata inside a write transaction."""
        txn.put(meta_key(meta.name), meta.to_json(), db=self.dbs.meta)

    def exists(self, txn, name: str) -> bool:
        """Whether a table of that name exists."""
        return txn.get(meta_key(name), db=self.dbs.meta) is not None

    def info(self, name: str) -> TableMeta:
        """Current metadata of a table."""
        with self.dbs.env.begin() as txn:
            return self.read(txn, name)

    def list(self) -> list[TableMeta]:
        """Metadata of every table, by name."""
        with self.dbs.env.begin() as txn:
            cursor = txn.cursor(db=self.dbs.meta)
            metas = []
            if cursor.set_range(META_PREFIX):
                for key, value in cursor:
                    if not key.startswith(META_PREFIX):
                        break
                    metas.append(TableMeta.from_json(value))
            return metas

    def next_table_id(self, txn) -> int:
        """Allocate a table id (inside a write transaction)."""
        raw = txn.get(_NEXT_TABLE_ID, db=self.dbs.meta)
        table_id = struct.unpack(">I", raw)[0] if raw else 1
        txn.put(_NEXT_TABLE_ID, struct.pack(">I", table_id + 1), db=self.dbs.meta)
        return table_id

    def put_compression_map(self, txn, table_id: int, cmap: np.ndarray) -> None:
        """Store a table's compression map (int64)."""
        txn.put(table_id_key(table_id), np.ascontiguousarray(cmap, dtype="<i8").tobytes(), db=self.dbs.maps)

    def delete(self, txn, meta: TableMeta) -> None:
        """Delete a table's metadata and compression map (its rows go separately)."""
        txn.delete(meta_key(meta.name), db=self.dbs.meta)
        txn.delete(table_id_key(meta.table_id), db=self.dbs.maps)

    def compression_map(self, name: str) -> np.ndarray | None:
        """The table's compression map (int64 [vocab]) or None."""
        with self.dbs.env.begin() as txn:
            meta = self.read(txn, name)
            blob = txn.get(table_id_key(meta.table_id), db=self.dbs.maps)
        return None if blob is None else np.frombuffer(blob, dtype="<i8").copy()
