"""Awareness of the protocols carried over HTTP: GraphQL (and over WebSocket), MCP,
WebSocket tunnels, and the operation name a call is known by in telemetry."""
