"""The registry: built-ins and third-party plugins load through the same entry-point group; broken plugins
are warnings naming them; two plugins claiming one name is an error naming both."""

import pytest

from mla_registry import registry
from mla_registry.errors import PluginError

PLUGIN = """
from mla_registry.builder import AttentionBuilder, Kwarg
from mla_registry.hookspecs import hookimpl


class Builder(AttentionBuilder):
    name = "{name}"
    version = "7"
    description = "a test plugin"
    kwargs = (Kwarg("width", int, 3, "how wide"),)


@hookimpl
def register_attention(register):
    register(Builder())
"""


def test_builtins_come_from_the_entry_point_group():
    registry.reset()
    reg = registry.get_registry()
    assert {"mha", "gqa", "mla"} <= set(reg.builders)
    assert reg.builders["mla"].package.startswith("mla-registry")
    assert not reg.broken
    # the built-ins were registered with pluggy as ordinary plugins
    assert {"mha", "gqa", "mla"} <= {name for name, _ in reg.pm.list_name_plugin()}


def test_third_party_plugin_is_listed(install_plugin):
    install_plugin("tp-dist", {"tp": "tp_plugin"}, {"tp_plugin": PLUGIN.format(name="tp-attn")})
    b = registry.get_builder("tp-attn")
    assert b.version == "7" and b.package == "tp-dist 1.0"
    assert b.validate({"width": "5"}) == {"width": 5}
    assert "mla" in registry.get_registry().builders


def test_broken_plugins_are_warnings_naming_them(install_plugin):
    install_plugin(
        "tp-broken",
        {"tp_bad_import": "tp_bad_import", "tp_bad_hook": "tp_bad_hook", "tp_ok": "tp_ok"},
        {
            "tp_bad_import": "import does_not_exist_anywhere\n",
            "tp_bad_hook": "from mla_registry.hookspecs import hookimpl\n\n@hookimpl\n"
                           "def register_attention(register):\n    raise RuntimeError('boom')\n",
            "tp_ok": PLUGIN.format(name="tp-ok"),
        },
    )
    with pytest.warns(registry.PluginLoadWarning) as caught:
        reg = registry.get_registry()
    messages = " ".join(str(w.message) for w in caught)
    assert "tp_bad_import" in messages and "does_not_exist_anywhere" in messages
    assert "tp_bad_hook" in messages and "boom" in messages
    assert set(reg.broken) == {"tp_bad_import", "tp_bad_hook"}
    assert "tp-ok" in reg.builders and "mla" in reg.builders


def test_two_plugins_claiming_one_name(install_plugin):
    install_plugin("tp-dup", {"tp_dup": "tp_dup"}, {"tp_dup": PLUGIN.format(name="mla")})
    with pytest.raises(PluginError) as err:
        registry.get_registry()
    assert "'mla'" in str(err.value) and "tp-dup" in str(err.value) and "mla-registry" in str(err.value)


def test_missing_plugin_names_it_and_quotes_the_manifests_package_as_a_claim():
    registry.reset()
    with pytest.raises(PluginError, match=r"no attention plugin named 'fancy'.*manifest says .*'fancy-attn'") as err:
        registry.get_builder("fancy", package_hint="fancy-attn")
    assert "pip install" not in str(err.value)  # a manifest's words are never offered as a command to run


def test_a_hook_that_does_not_match_the_hookspec_is_a_warning_not_a_crash(install_plugin):
    install_plugin("tp-mismatch", {"tp_mismatch": "tp_mismatch", "tp_ok2": "tp_ok2"}, {
        "tp_mismatch": "from mla_registry.hookspecs import hookimpl\n\n@hookimpl\n"
                       "def register_attention(register, extra):\n    pass\n",
        "tp_ok2": PLUGIN.format(name="tp-ok2"),
    })
    with pytest.warns(registry.PluginLoadWarning, match="tp_mismatch.*does not match the hook specification"):
        reg = registry.get_registry()
    assert "tp_mismatch" in reg.broken and "tp-ok2" in reg.builders


def test_a_misspelled_hook_or_no_builder_is_a_warning_naming_the_plugin(install_plugin):
    install_plugin("tp-quiet", {"tp_typo": "tp_typo", "tp_empty": "tp_empty"}, {
        "tp_typo": "from mla_registry.hookspecs import hookimpl\n\n@hookimpl\n"
                   "def register_atention(register):\n    pass\n",
        "tp_empty": "from mla_registry.hookspecs import hookimpl\n\n@hookimpl\n"
                    "def register_attention(register):\n    pass\n",
    })
    with pytest.warns(registry.PluginLoadWarning) as caught:
        reg = registry.get_registry()
    messages = " ".join(str(w.message) for w in caught)
    assert "'tp_typo'" in messages and "no register_attention hook" in messages and "register_atention" in messages
    assert "'tp_empty'" in messages and "registered no builder" in messages
    assert "mla" in reg.builders


def test_cli_survives_a_broken_plugin(install_plugin):
    from click.testing import CliRunner

    from mla_registry.cli.main import cli

    install_plugin("tp-crash", {"tp_crash": "tp_crash"}, {
        "tp_crash": "from mla_registry.hookspecs import hookimpl\n\n@hookimpl\n"
                    "def register_attention(register, wrong):\n    pass\n"})
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0 and "mla" in result.output and "BROKEN tp_crash" in result.output
