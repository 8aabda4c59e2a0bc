"""Awareness of the protocols carried over HTTP: GraphQL (and over WebSocket), MCP and
WebSocket tunnels. The operation a call is known by (steps/operation.py) is shared by
every group of steps, so it sits beside them."""
