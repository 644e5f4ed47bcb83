"""Every built-in plugin through the conformance kit (mla_registry.testing), exactly as a third-party plugin
runs it: round trip through save and a fresh process, causality, measured = declared cache, declared
equivalences (full rank / full heads reproduce MHA; absorbed = re-expanded), backward, groups, the stock
export (to_stock), bf16, CUDA."""

from mla_registry.plugins.gqa import GqaBuilder
from mla_registry.plugins.mha import MhaBuilder
from mla_registry.plugins.mla import MlaBuilder
from mla_registry.testing import conformance_test

test_mha = conformance_test(MhaBuilder(), [{}])
test_gqa = conformance_test(GqaBuilder(), [{"kv_heads": 1}, {"kv_heads": 2},
                                           {"kv_heads": 2, "grouping": "search", "align": True},
                                           {"kv_heads": 1, "align": True},
                                           {"kv_heads": 2, "pool": "fit", "grouping": "search"},
                                           {"kv_heads": 1, "pool": "fit"}])
test_mla = conformance_test(MlaBuilder(), [{"rank": 16, "init": "svd"}, {"rank": 16, "init": "activation"},
                                           {"rank": 24, "init": "svd", "absorb": False},
                                           {"rank": 16, "init": "attention"}, {"rank": 16, "init": "scores"},
                                           {"rank": 16, "init": "activation", "refit": True},
                                           {"rank": 16, "init": "output"}])
test_mla_decoder_only = conformance_test(MlaBuilder(), [{"rank": 16, "init": "activation"}],
                                         kinds=("decoder.self", "decoder.cross"), checks=("roundtrip", "cache"))
test_mla_budget = conformance_test(MlaBuilder(), [{"budget": 0.25, "init": "attention"},
                                                 {"budget": 0.125, "init": "scores", "share_cross": True},
                                                 {"budget": 0.125, "init": "output"},
                                                 {"budget": 0.125, "init": "output", "share_cross": True}],
                                   kinds=("decoder.self", "decoder.cross"), checks=("roundtrip", "cache", "backward"))
