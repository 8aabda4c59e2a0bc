"""Credentials the sidecar injects, fetches, caches and signs with.

- auth.py: the `auth` step for every kind, and the header each kind writes;
- oauth2.py: OAuth2 client credentials tokens;
- jwt_auth.py: JWTs minted and signed by the sidecar;
- bearer.py: a bearer token with a lifetime (GCP, Azure);
- gcp.py, azure.py: Google Cloud and Azure credentials;
- refresh.py: a credential with a lifetime, fetched once for every caller
  (single flight), used until shortly before it expires, then renewed;
- sigv4.py: AWS Signature Version 4;
- aws.py: AWS credentials (keys, shared profile, web identity) and the
  `aws_sigv4` step.
"""
