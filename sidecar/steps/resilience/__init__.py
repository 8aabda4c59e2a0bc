"""What keeps a service usable under load and failure: rate limits (local and Redis),
pauses, retries, the circuit breaker, timeouts, injected faults and fallback, with the
outcomes the breaker and retry count."""
