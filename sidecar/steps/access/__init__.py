"""Who is calling and may they: identity (keys, JWTs), allow rules, request rules,
OpenAPI validation and object-store rules. Each refuses before anything is spent."""
