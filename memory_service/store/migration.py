"""Moving rows between shards of a pool: a table's blueprint, chunks out, chunks in, unowned chunks dropped.

A scale (orchestration/pool.py) gives a new shard the table's blueprint (spec, chunking,
version numbers), freezes the moving ranges on their old shard, exports their chunks
with every version and the Adam state (recent pushed rows folded in first), imports them
on the new owner, flips the map, and finally drops what each shard no longer owns.
"""

from __future__ import annotations

import struct

import numpy as np

from memory_service.errors import FailedPrecondition, shown
from memory_service.spec import EngramSpec
from memory_service.store.catalog import Catalog
from memory_service.store.compaction import Compactor
from memory_service.store.layout import OPT, ROWS, Databases, chunk_key, parse_key, prefix_items
from memory_service.store.ownership import Ownership
from memory_service.store.snapshots import Snapshots
from memory_service.store.versions import Versions
from memory_service.store.write_path import WritePath
from memory_service.table_meta import TableMeta

_SUFFIX = struct.Struct(">BIII")  # kind, version, layer, chunk: a chunk's key without the table id


class ShardMoves:
    """Export, import and drop the chunks of row ranges that change shards."""

    def __init__(self, dbs: Databases, catalog: Catalog, ownership: Ownership, versions: Versions, writes: WritePath,
                 compactor: Compactor, snapshots: Snapshots):
        self.dbs, self.catalog, self.ownership, self.versions = dbs, catalog, ownership, versions
        self.writes, self.compactor, self.snapshots = writes, compactor, snapshots

    def _settle(self, meta: TableMeta, layers) -> None:
        """Every version's recent rows and runs of some layers into their chunks (inside exclusive())."""
        for version in meta.versions:
            for layer in layers:
                self.compactor.settle(meta, (meta.table_id, version, layer))

    def blueprint(self, name: str) -> dict:
        """What another shard needs to hold this table: spec, compression map, chunking, versions, active."""
        meta = self.catalog.info(name)
        cmap = self.catalog.compression_map(name)
        return {"spec_json": meta.spec.to_json(), "compression_map": None if cmap is None else cmap.tobytes(),
                "chunk_rows": meta.chunk_rows, "versions": sorted(meta.versions), "active": meta.active}

    def adopt_table(self, name: str, blueprint: dict) -> None:
        """Create a table with another shard's spec and version numbers but no rows (rows arrive by import_chunks)."""
        spec = EngramSpec.from_json(blueprint["spec_json"])
        cmap = None if blueprint["compression_map"] is None else np.frombuffer(blueprint["compression_map"], dtype="<i8")
        if name not in {m.name for m in self.catalog.list()}:
            self.versions.create_table(name, spec, cmap, init_std=0.0, chunk_rows=blueprint["chunk_rows"])
        wanted = set(blueprint["versions"])
        while max(self.catalog.info(name).versions) < max(wanted):
            self.versions.create_version(name, init_std=0.0)
        if self.catalog.info(name).active != blueprint["active"]:
            self.versions.swap(name, blueprint["active"])
        for version in sorted(set(self.catalog.info(name).versions) - wanted):
            self.versions.drop_version(name, version)

    def _chunk_range(self, meta: TableMeta, kind: int, start_row: int, stop_row: int) -> tuple[int, int]:
        """Chunks [first, end) of a kind holding rows [start_row, stop_row)."""
        rows = meta.chunk_rows if kind == ROWS else meta.opt_rows
        return start_row // rows, -(-stop_row // rows)

    def export_chunks(self, name: str, layer: int, start_row: int, stop_row: int) -> list[tuple[bytes, bytes]]:
        """Every version's chunks (rows and optimizer state) holding rows [start, stop): [(key suffix, value)]."""
        meta = self.catalog.info(name)
        with self.compactor.exclusive():  # recent rows and runs into the chunks that travel (the rows are frozen)
            self._settle(meta, [layer])
        out = []
        with self.dbs.env.begin() as txn:
            for version in meta.versions:
                for kind in (ROWS, OPT):
                    first, end = self._chunk_range(meta, kind, start_row, stop_row)
                    for key, value in prefix_items(txn, self.dbs.db_of(kind), kind, meta.table_id, version, layer):
                        chunk = parse_key(key)[4]
                        if first <= chunk < end:
                            out.append((_SUFFIX.pack(kind, version, layer, chunk), bytes(value)))
        return out

    def import_chunks(self, name: str, layer: int, chunks: list[tuple[bytes, bytes]], start_row: int, stop_row: int) -> int:
        """Store chunks another shard exported for rows [start_row, stop_row) of a layer (same version numbers).

        Row chunks are whole (shard ranges are cut at chunk boundaries); what this shard held in
        the range before goes first, since the source sends no chunk for rows that are all zeros
        (an absent chunk). An optimizer chunk may also hold rows this shard keeps: only the
        records of rows in the range are taken from it.
        """
        meta = self.catalog.info(name)
        restructured = {(meta.table_id, version, layer) for version in meta.versions}
        with self.compactor.exclusive():
            self._settle(meta, meta.layer_rows)  # nothing recent may be laid over the chunks that arrive
            txn = self.dbs.env.begin(write=True)
            try:
                self._clear_range(txn, meta, layer, start_row, stop_row)
                for suffix, value in chunks:
                    kind, version, chunk_layer, chunk = _SUFFIX.unpack(suffix)
                    if chunk_layer != layer:
                        raise FailedPrecondition(f"a chunk of layer {chunk_layer} came with a move of layer {layer}")
                    if version not in meta.versions:
                        raise FailedPrecondition(f"version {version} of {shown(name)} does not exist on this shard")
                    key = chunk_key(kind, meta.table_id, version, layer, chunk)
                    if kind == OPT:
                        value = self._merged_records(txn, meta, key, chunk, value, start_row, stop_row)
                    txn.put(key, value, db=self.dbs.db_of(kind))
                with self.snapshots.replacing(restructured):
                    txn.commit()
            except BaseException:
                txn.abort()
                raise
        return len(chunks)

    def _clear_range(self, txn, meta: TableMeta, layer: int, start_row: int, stop_row: int) -> None:
        """Delete this shard's chunks that lie wholly in rows [start_row, stop_row) of a layer, every version."""
        for kind in (ROWS, OPT):
            rows = meta.chunk_rows if kind == ROWS else meta.opt_rows
            first, end = -(-start_row // rows), stop_row // rows  # chunks wholly inside
            if stop_row == meta.layer_rows[layer]:
                end = -(-stop_row // rows)  # the layer's last chunk ends with it
            db = self.dbs.db_of(kind)
            for version in meta.versions:
                doomed = [bytes(key) for key, _ in prefix_items(txn, db, kind, meta.table_id, version, layer)
                          if first <= parse_key(key)[4] < end]
                for key in doomed:
                    txn.delete(key, db=db)

    def _merged_records(self, txn, meta: TableMeta, key: bytes, chunk: int, incoming: bytes, start_row: int,
                        stop_row: int) -> bytes:
        """This shard's optimizer chunk with the incoming records of rows in [start_row, stop_row) written in."""
        nbytes, rows = meta.opt_record.itemsize, meta.opt_rows
        current = txn.get(key, db=self.dbs.opt)
        merged = np.zeros(rows * nbytes, dtype=np.uint8) if current is None else np.frombuffer(current, np.uint8).copy()
        lo, hi = max(start_row, chunk * rows) - chunk * rows, min(stop_row, (chunk + 1) * rows) - chunk * rows
        merged[lo * nbytes:hi * nbytes] = np.frombuffer(incoming, np.uint8)[lo * nbytes:hi * nbytes]
        return merged.tobytes()

    def drop_unowned_chunks(self, name: str) -> int:
        """Delete chunks holding no row this shard owns (after a move); returns how many."""
        meta = self.catalog.info(name)
        dropped, restructured = 0, set()
        with self.compactor.exclusive():  # one hold: no push or compaction lands between settling and dropping
            self._settle(meta, meta.layer_rows)  # later compaction must not bring dropped chunks back
            for layer in meta.layer_rows:
                owned = self.ownership.owned_range(name, layer)
                if owned is None:
                    continue
                txn = self.dbs.env.begin(write=True)
                try:
                    for version in meta.versions:
                        for kind in (ROWS, OPT):
                            first, end = self._chunk_range(meta, kind, *owned)
                            db = self.dbs.db_of(kind)
                            doomed = [bytes(key) for key, _ in prefix_items(txn, db, kind, meta.table_id, version, layer)
                                      if not first <= parse_key(key)[4] < end]
                            for key in doomed:
                                txn.delete(key, db=db)
                            dropped += len(doomed)
                        restructured.add((meta.table_id, version, layer))
                    with self.snapshots.replacing(restructured):
                        txn.commit()
                except BaseException:
                    txn.abort()
                    raise
        return dropped
