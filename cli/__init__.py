"""The mla-registry command line (installed as mla_registry.cli)."""
