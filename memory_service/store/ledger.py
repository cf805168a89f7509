"""The request ledger: ids of writes already applied, so a retried write (same request id) is applied once."""

from __future__ import annotations

import struct
import time

from memory_service.store.layout import Databases

MAX_REQUEST_ID_BYTES = 128  # LMDB keys are at most 511 bytes; request ids are uuids (32 hex characters)
_PREFIX = b"req:"
_RECORD = struct.Struct(">Qd")  # version, unix time


class RequestLedger:
    """Reads and writes the `requests` database."""

    def __init__(self, dbs: Databases):
        self.dbs = dbs

    @staticmethod
    def _key(request_id: str) -> bytes:
        key = _PREFIX + request_id.encode()
        assert len(key) <= len(_PREFIX) + MAX_REQUEST_ID_BYTES, "request ids are bounded where requests arrive"
        return key

    def seen(self, txn, request_id: str | None) -> int | None:
        """Version recorded for an already-applied request id, else None."""
        if not request_id:
            return None
        done = txn.get(self._key(request_id), db=self.dbs.requests)
        return _RECORD.unpack(done)[0] if done is not None else None

    def record(self, txn, request_id: str | None, version: int) -> None:
        """Remember a request id as applied (inside the write's own transaction)."""
        if request_id:
            txn.put(self._key(request_id), _RECORD.pack(version, time.time()), db=self.dbs.requests)

    def prune(self, older_than_s: float = 3600.0) -> int:
        """Forget request ids recorded more than older_than_s ago; returns how many."""
        cutoff, dropped = time.time() - older_than_s, 0
        with self.dbs.wal_env.begin(write=True) as txn:
            cursor = txn.cursor(db=self.dbs.requests)
            for key, value in list(cursor):
                if _RECORD.unpack(value)[1] < cutoff:
                    txn.delete(key, db=self.dbs.requests)
                    dropped += 1
        return dropped
