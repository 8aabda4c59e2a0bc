"""`sidecar discover URL`: probe a live API the way a person would and draft its policy.

probe.py sends the probes (bounded in count and time, redirects followed only on
the same host, no credential but the ones given); findings.py reads what came
back (an OpenAPI document, a GraphQL schema, an MCP server's tools, the auth
scheme); command.py writes the service policy and reports one line per probe.
importer.py writes a service policy from an OpenAPI document, for `discover` and for
`sidecar import openapi SPEC` alike.
"""
