"""The contract every layer shares, at the bottom of the package: Call and Reply (call.py),
the sidecar's own refusals (problems.py), header names and hop-by-hop rules (headers.py),
body streams (streams.py, kept interpreted: mypyc cannot compile async generators) and
the state kept across reloads (state.py). It imports nothing of the sidecar above it."""
