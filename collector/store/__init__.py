"""Everything that touches SQL: schema, the ingest writer and the operators' queries."""

from collector.store.database import open_database

__all__ = ["open_database"]
