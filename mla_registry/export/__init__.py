"""Export a checkpoint to another runtime: plain transformers (stock attention, exact re-expansion), CTranslate2
(through its own converter) or ONNX (the plugin's own modules and cache). :func:`export` dispatches."""

from .core import FORMATS, PROVENANCE, export, read_provenance

__all__ = ["FORMATS", "PROVENANCE", "export", "read_provenance"]
