"""Engines: the parts that decide, below every protocol. They know nothing of HTTP,
`Call` or `Reply`; a connector's step or guard is a thin adapter over them (Envoy's
rate-limit and RBAC engines serve its network and HTTP filters alike).

- limits.py: token buckets, one per service or per agent; limits_redis.py: their Redis
  form, shared by several sidecars (and the Redis client the budgets reuse);
- breaker.py: a circuit breaker's state machine;
- identity.py: a presented key or JWT turned into an agent name; jwks.py: JWT
  verification against an issuer's JWK Set; refused.py: why a credential proves none;
- allow.py: allow rules compiled and matched on who, what and where;
- ledger.py: what each budget has spent in its window (in memory), kept in the data
  dir's SQLite file (ledger_sqlite.py) or in Redis (ledger_redis.py).

Secret resolution stays in policy/secrets.py: `${env:}` and `${file:}` are resolved
while the policy models validate, so it sits at the policy's floor, below this one.
"""
