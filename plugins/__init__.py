"""Built-in attention plugins (installed as mla_registry.plugins)."""
