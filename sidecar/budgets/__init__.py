"""Budget state that outlives the process: what each budget has spent in its window.

`ledger.py` keeps it in the sidecar's data dir (SQLite), `steps/llm/budget_redis.py` in
Redis when the budget has a `backend` (shared by several sidecars). The step
that admits and charges calls is steps/llm/budget.py.
"""
