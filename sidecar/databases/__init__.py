"""PostgreSQL connector: agents reach databases through the sidecar, governed by policy."""
