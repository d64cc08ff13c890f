"""The HTTP edge: routes, thin handlers and the OCI error envelope."""
