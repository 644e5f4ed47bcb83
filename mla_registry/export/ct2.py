"""``--to ctranslate2``: the stock export (:mod:`.stock`) run through CTranslate2's own converter
(``ctranslate2.converters.TransformersConverter``), float32 or quantized (``int8``, ``float16``, ...). Like the
stock format it holds full K/V: CTranslate2 runs only stock attention."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, write_json
from ..errors import ExportError, InstallError
from .stock import CACHE_NOTE, load_stock, write_stock

QUANTIZATIONS = ("float32", "int8", "int8_float32", "float16", "int8_float16", "bfloat16")
# what CTranslate2's Whisper needs beside model.bin to turn features and tokens into text
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                   "generation_config.json")


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise InstallError("--to ctranslate2 needs CTranslate2: pip install 'mla-registry[ctranslate2]'") from None
    return ctranslate2


def export_ctranslate2(ckpt: Path, out: Path, quantization: str = "float32") -> dict[str, Any]:
    """Write the CTranslate2 model of checkpoint ``ckpt`` (through a temporary stock directory) and its
    provenance to ``out`` atomically."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization!r}: allowed: {', '.join(QUANTIZATIONS)}")
    ct2 = _ctranslate2()
    from .core import PROVENANCE, provenance

    stock, processor = load_stock(ckpt)
    info = provenance(ckpt, "ctranslate2", {"cache": CACHE_NOTE, "quantization": quantization,
                                            "ctranslate2": ct2.__version__})
    with tempfile.TemporaryDirectory(prefix="mla-registry-stock-") as stock_dir, atomic_dir(out) as tmp:
        write_stock(stock, processor, Path(stock_dir))
        converter = ct2.converters.TransformersConverter(stock_dir, low_cpu_mem_usage=False)
        # the converter writes into a directory of its own: a subfolder of the atomic one, then moved up
        target = tmp / "ct2"
        converter.convert(str(target), quantization=None if quantization == "float32" else quantization)
        for f in target.iterdir():
            shutil.move(str(f), tmp / f.name)
        target.rmdir()
        for name in PROCESSOR_FILES:
            if (Path(stock_dir) / name).is_file():
                shutil.copy2(Path(stock_dir) / name, tmp / name)
        write_json(tmp / PROVENANCE, info)
    return info
