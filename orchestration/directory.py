"""The directory: shard addresses, each table's shard map and active version, under one epoch.

A plain class run as a named Ray actor. Every change of a shard map or of an active
version bumps the epoch; clients carry the epoch in their requests, shards refuse older
ones, and a refused client reads the directory again. Swapping the active version is one
call here, so every shard's rows are served from the new version from the same epoch on.
"""

from __future__ import annotations


class Directory:
    """Cluster-wide map of the memory pool."""

    def __init__(self):
        self.epoch = 0
        self.config: dict = {}  # the pool's PoolConfig, for drivers that attach later (a scale starts shards with it)
        self.addresses: list[str] = []
        self.tables: dict[str, dict] = {}  # name -> {"bounds": {layer: [...]}, "active": v, "layer_rows": {...}}

    def set_config(self, config: dict) -> None:
        """Record the pool's settings (the first driver's; a pool keeps them for its life)."""
        if not self.config:
            self.config = dict(config)

    def set_shards(self, addresses: list[str]) -> int:
        """Record the shard addresses (index = shard id); bumps the epoch."""
        self.addresses = list(addresses)
        self.epoch += 1
        return self.epoch

    def set_table(self, name: str, bounds: dict[int, list[int]], active: int, layer_rows: dict[int, int], chunk_rows: int) -> int:
        """Record a table's row ranges per shard and its active version; bumps the epoch."""
        history = self.tables.get(name, {}).get("history", [])
        self.tables[name] = {"bounds": {int(k): list(v) for k, v in bounds.items()}, "active": active,
                             "layer_rows": {int(k): v for k, v in layer_rows.items()}, "chunk_rows": chunk_rows,
                             "history": history}
        self.epoch += 1
        return self.epoch

    def set_active(self, name: str, version: int, remember: bool = True) -> int:
        """Flip a table's active version for every shard at once; bumps the epoch."""
        table = self.tables[name]
        if remember and table["active"] != version:
            table.setdefault("history", []).append(table["active"])
        table["active"] = version
        self.epoch += 1
        return self.epoch

    def previous_active(self, name: str) -> int | None:
        """The version active before the last swap (None if there is none)."""
        history = self.tables[name].get("history", [])
        return history[-1] if history else None

    def forget_previous(self, name: str) -> None:
        """Drop the newest history entry (after a rollback to it)."""
        history = self.tables[name].get("history", [])
        if history:
            history.pop()

    def forget_version(self, name: str, version: int) -> None:
        """A dropped version leaves the swap history (rollback never returns to it)."""
        table = self.tables[name]
        table["history"] = [v for v in table.get("history", []) if v != version]

    def drop_table(self, name: str) -> None:
        """Forget a table."""
        self.tables.pop(name, None)
        self.epoch += 1

    def shard_map(self, name: str) -> dict | None:
        """{addresses, bounds, epoch, active, layer_rows, chunk_rows} of a table (None if unknown)."""
        if name not in self.tables:
            return None
        table = self.tables[name]
        return {"addresses": list(self.addresses), "bounds": table["bounds"], "epoch": self.epoch, "active": table["active"],
                "layer_rows": table["layer_rows"], "chunk_rows": table["chunk_rows"]}

    def state(self) -> dict:
        """Everything, for `engram cluster status`."""
        return {"epoch": self.epoch, "addresses": list(self.addresses), "tables": self.tables, "config": self.config}
