"""mla_registry.convert: conversion recorded in the model's lineage, calibration used only when asked for."""

from __future__ import annotations

from mla_registry import checkpoint, lineage, model_refs
from mla_registry.calibration import CalibrationSettings
from mla_registry.convert import convert_and_save, convert_model


def test_conversions_accumulate_in_the_lineage(tiny_model):
    model = tiny_model()
    processor = model_refs.load_processor("bundled:whisper-tiny.en")
    convert_model(model, processor, ["decoder.self=gqa:kv_heads=2"], source_model="base")
    convert_model(model, processor, ["decoder.cross=mla:rank=8,init=svd"], source_model="step1")
    prov = lineage.of(model).provenance
    assert prov.source_model == "base"
    assert [c["attention_specs"] for c in prov.conversions] == [["decoder.self=gqa:kv_heads=2"],
                                                                ["decoder.cross=mla:rank=8,init=svd"]]
    assert [r.plugin for r in lineage.of(model).slots] == ["gqa", "mla", "gqa", "mla"]


def test_activation_conversion_records_the_calibration_it_used(tmp_path):
    settings = CalibrationSettings("builtin:real?source=librispeech_dev_clean", 2)
    out = convert_and_save("bundled:whisper-tiny.en", ["decoder.self=mla:rank=192"], tmp_path / "c", settings)
    calibration = checkpoint.read_manifest(out)["provenance"]["conversions"][0]["calibration"]
    assert calibration["ref"] == settings.data and calibration["size"] == 2 and calibration["fingerprint"]
