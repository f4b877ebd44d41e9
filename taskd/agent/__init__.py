"""The reference agent: runs on every managed server.

It imports only ``taskd.protocol``, ``taskd.errors`` and ``taskd.config`` from
the rest of taskd, so it could ship on its own.
"""
