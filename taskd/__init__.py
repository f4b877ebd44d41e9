"""taskd: task orchestration for server fleets."""

__version__ = "0.1.0"
