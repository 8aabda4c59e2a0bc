"""`sidecar learn`: an OpenAPI document and least-privilege allow rules, from what agents did.

The samples (samples.py) come from cassettes, the access log or `mode: observe`
files; paths.py turns observed paths into templates, shapes.py merges JSON
bodies into schemas, document.py writes the OpenAPI 3.1 document and rules.py
the allow rules per agent and the drift against a policy in force.
"""
