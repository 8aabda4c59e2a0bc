"""The operator console: a page on the admin port and the JSON API behind it.

telemetry/figures.py reads what telemetry already counts (every 10 s into a
bounded ring, and once per API read); api.py turns that and the live state
(breakers, budgets, queues, pools, alerts) into the document `GET /api/console`
answers; static/ holds the page, served as package data with no build step.
"""
