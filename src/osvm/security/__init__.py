"""Security: the internal certificate authority, workload identities, and connection policy between components."""
