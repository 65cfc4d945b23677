"""The agent's exception hierarchy: one base, readable messages.

Foreign errors (sqlite3.Error, OSError, grpc.RpcError) are translated into these
where they enter our code, so the CLI can print one line and exit non-zero.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class SpoolError(AgentError):
    """The on-disk spool cannot be opened, written or read, or refuses a batch."""


class ConfigError(AgentError):
    """The agent's configuration file or flags are invalid."""


class TransportError(AgentError):
    """The collector cannot be reached or refused the conversation."""


class SensorError(AgentError):
    """A sensor cannot read what it measures from the OS."""


class EnrollError(AgentError):
    """The agent's key, its certificate request, the collector's CA or the Enroll call failed."""


class CredentialsError(AgentError):
    """The enrolled identity in the state directory is missing, unreadable or inconsistent."""


class NotEnrolledError(CredentialsError):
    """The state directory holds no certificate: the agent must enroll (or run insecure)."""
