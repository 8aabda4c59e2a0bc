"""LLM APIs: token metering, token limits, budgets (local and Redis) and translation
between one LLM API and another."""
