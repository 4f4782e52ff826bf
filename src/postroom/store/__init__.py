"""The ticket stores: adapters that keep :mod:`postroom.tickets` objects.

- :mod:`postroom.store.redis`: the Redis ticket store (:class:`~postroom.store.redis.RedisStore`) and
  :func:`~postroom.store.redis.connect`, the one client (one connection pool) a process makes;
- :mod:`postroom.store.assignment`: the rules' and auto-replies' Redis state, on the same client;
- :mod:`postroom.store.keyspace`: every Redis key name; :mod:`postroom.store.scripts`: the Lua scripts;
- :mod:`postroom.store.memory`: the same behaviour in dicts, for unit tests and ``postroom rules test``.

This package's ``__init__`` imports nothing, so the in-memory store loads without the Redis driver.
"""
