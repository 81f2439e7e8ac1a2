"""Model providers: one module per backend, a registry, and the small async interface in `base`."""
