"""The built-in dashboard served at ``/ui/``: sessions, one JSON-RPC endpoint, a live fleet feed.

``routes.py`` mounts it, ``session.py`` keeps logins server-side, ``live.py`` pushes the
fleet's latest figures once a second, and ``static/`` holds the page's own ES modules
(third-party assets are copied from npm into ``static/vendor/`` at install time).
"""
