"""Client of the memory service: the data plane (memory_client.py) over channels with retries (transport.py)."""

from memory_service.client.memory_client import MemoryClient, PendingLookup
from memory_service.client.transport import ShardChannels, parse_address

__all__ = ["MemoryClient", "PendingLookup", "ShardChannels", "parse_address"]
