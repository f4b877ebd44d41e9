"""Alerts: rules watched on agents, events recorded once, notifications sent through Apprise.

- ``rules.py``     the rule kinds and their validation
- ``events.py``    the event query, the wire shape and the messages (one, or a summary)
- ``presence.py``  which agents are connected, from hub and cluster events
- ``evaluator.py`` evaluation on the node that leads: starts, reminders, resolutions
- ``channels.py``  Apprise URLs: checked, redacted, sent to
- ``notifier.py``  the outbox sender: a worker per channel, batching, retries
"""
