"""Credentials the sidecar fetches, caches and signs with: one module per cloud.

- refresh.py: a credential with a lifetime, fetched once for every caller
  (single flight), used until shortly before it expires, then renewed;
- sigv4.py: AWS Signature Version 4;
- aws.py: AWS credentials (keys, shared profile, web identity) and the
  `aws_sigv4` step.

The older kinds (steps/auth.py, oauth2.py, jwt_auth.py) stay where they are.
"""
