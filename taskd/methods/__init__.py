"""JSON-RPC methods, one module per namespace; importing this package registers them all."""

from taskd.methods import agent, alert, crontab, kv, monitoring, server, task, token

__all__ = ["agent", "alert", "crontab", "kv", "monitoring", "server", "task", "token"]
