"""Table administration: one interface (table_admin.py), served over gRPC by ServiceAdmin (service_admin.py)."""

from memory_service.admin.service_admin import ServiceAdmin
from memory_service.admin.table_admin import TableAdmin, TableInfo, VersionInfo

__all__ = ["ServiceAdmin", "TableAdmin", "TableInfo", "VersionInfo"]
