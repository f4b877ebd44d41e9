"""What a committed token change does: every node forgets the token's cached row, and when
it was revoked, rolled or narrowed, the agent subscriptions and terminal sessions it opened end.

A subscription or a terminal session is authorised once, when it is made: without this a
revoked agent token would go on receiving tasks over its open WebSocket.
"""

from __future__ import annotations

from taskd.auth import Authenticator
from taskd.cluster import Cluster
from taskd.hub import Hub, Subscription
from taskd.terminal import TerminalRelay


class Revocation:
    """Applies token changes here, and passes those made here on to the other nodes."""

    def __init__(
        self, auth: Authenticator, hub: Hub, terminals: TerminalRelay, cluster: Cluster
    ) -> None:
        self.auth = auth
        self.hub = hub
        self.terminals = terminals
        self.cluster = cluster

    async def token_changed(self, key: str, *, revoke: bool) -> list[Subscription]:
        """Token ``key`` changed through this node; with ``revoke`` end what it opened.

        Returns the subscriptions that ended: the caller closes their connections (after
        its reply, which may travel over one of them).
        """
        ended = self._apply(key, revoke)
        await self.cluster.announce_token(key, revoke)
        return ended

    def token_changed_elsewhere(self, key: str, revoke: bool) -> None:
        """Token ``key`` changed through another node: apply it here, closing connections."""
        for sub in self._apply(key, revoke):
            sub.peer.close_soon(1008)

    def _apply(self, key: str, revoke: bool) -> list[Subscription]:
        self.auth.invalidate(key)
        if not revoke:
            return []
        ended = self.hub.end_subscriptions_of(key)
        self.terminals.revoke(key)
        return ended
