"""Answers given without the upstream: the HTTP cache (local and Redis), mocks from
an OpenAPI document, and recorded cassettes."""
