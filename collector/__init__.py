"""The zonewatch collector: receives facts from agents, stores them, answers operators."""

__version__ = "0.1.0"
