"""The HTTP connector: the listener (HTTP/1.1 on httptools), the egress app, the router
that compiles a policy into chains of steps, and the upstream pools.

Beside it, the other connectors: databases/ (the PostgreSQL wire protocol) and files/
(a files service in the place of an upstream)."""
