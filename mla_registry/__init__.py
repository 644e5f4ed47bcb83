"""mla-registry: convert, save, reload and evaluate attention variants of pretrained speech recognisers."""

__version__ = "0.1.0"
