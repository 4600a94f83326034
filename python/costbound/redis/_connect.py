"""A new blocking client to the server a user's client talks to (for the sends at exit).

At interpreter exit an asyncio client cannot be used (its event loop is gone), and a user's
blocking client may wait without a timeout; the calls still owed are sent over a client made
here from the given one's settings, with short timeouts and no retries of its own.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["blocking_twin"]

# Connection settings that mean the same to redis-py's blocking and asyncio connections.
_PORTABLE = (
    "host",
    "port",
    "path",
    "db",
    "username",
    "password",
    "credential_provider",
    "client_name",
    "protocol",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_check_hostname",
)


def blocking_twin(client: Any, timeout: float) -> Any:  # noqa: ANN401 - a redis-py client
    """Make a blocking client to ``client``'s server whose every step gives up after ``timeout``.

    ``client`` is a ``redis.Redis``, a ``redis.asyncio.Redis`` or either kind of
    ``RedisCluster``. The caller closes what this returns.
    """
    limits: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if hasattr(client, "get_nodes"):  # a cluster: any node finds the others
        node = client.get_default_node() or client.get_nodes()[0]
        return redis.cluster.RedisCluster(host=node.host, port=node.port, **limits)
    pool = client.connection_pool
    settings = {k: v for k, v in pool.connection_kwargs.items() if k in _PORTABLE}
    kind = pool.connection_class.__name__
    if "SSL" in kind:
        connection_class: type[Any] = redis.SSLConnection
    elif "Unix" in kind or "path" in settings:
        connection_class = redis.UnixDomainSocketConnection
    else:
        connection_class = redis.Connection
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=connection_class, **settings, **limits
        )
    )
