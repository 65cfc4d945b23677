"""The collector's exception hierarchy: one base, readable messages.

Foreign errors (sqlite3.Error, OSError, grpc.RpcError) are translated into these
where they enter our code, so the CLI can print one line and exit non-zero.
"""

from __future__ import annotations


class CollectorError(Exception):
    """Base of every error the collector raises on purpose."""


class StoreError(CollectorError):
    """The database cannot be opened, migrated or queried."""


class QueryError(CollectorError):
    """An operator's query is malformed (unknown agent, bad time range, ...)."""


class ValidationError(CollectorError):
    """An agent sent something we refuse to store.

    ``field`` is the path of the offending field ("batch.facts[3].interface_sample.rx_bps"),
    ``code`` the gRPC status code name to answer with.
    """

    def __init__(self, field: str, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.code = code
