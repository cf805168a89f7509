"""The LMDB table store: Engram rows in chunks of raw bytes, versions, row-wise Adam (table_store.py has the map)."""

from memory_service.store.table_store import TableStore
from memory_service.table_meta import DEFAULT_CHUNK_ROWS

__all__ = ["DEFAULT_CHUNK_ROWS", "TableStore"]
