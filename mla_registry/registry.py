"""Attention-type name → builder, filled by plugins through the ``register_attention`` hook.

Plugins are found through the ``mla_registry`` entry-point group; the built-in ``mha``, ``gqa`` and ``mla``
plugins are listed there by this package's own metadata, so they load exactly like third-party ones. Each entry
point is imported and called on its own: a broken plugin becomes a warning naming it, never a crash of the others.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from . import hookspecs
from .builder import AttentionBuilder
from .errors import PluginError

ENTRY_POINT_GROUP = "mla_registry"


class PluginLoadWarning(UserWarning):
    """A plugin failed to import or to register; the other plugins still work."""


@dataclass
class Registry:
    """The loaded plugins and the builders they registered."""

    pm: pluggy.PluginManager
    builders: dict[str, AttentionBuilder] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # plugin name -> error message

    def get(self, name: str, package_hint: str | None = None) -> AttentionBuilder:
        """The builder registered as ``name``, or a :class:`PluginError` naming it (and the package a manifest
        says provided it)."""
        try:
            return self.builders[name]
        except KeyError:
            # the hint comes from a checkpoint's manifest: quote it as that file's claim, never as a command to
            # run (a hostile manifest could name any package, or a shell line)
            hint = (f" The checkpoint's manifest says it came from the package {package_hint!r} (its claim, not "
                    "checked: install it only if you trust that package)." if package_hint else "")
            broken = f" Plugins that failed to load: {', '.join(self.broken)}." if self.broken else ""
            raise PluginError(
                f"no attention plugin named '{name}' is installed (available: {', '.join(sorted(self.builders))})."
                + hint + broken
            ) from None

    def add_plugin(self, plugin: ModuleType | object, name: str, package: str, version: str) -> None:
        """Register ``plugin`` with pluggy and collect the builders its hook registers."""
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:  # a hook implementation that does not match its hookspec
            self._broken(name, f"its hook does not match the hook specification: {exc}")
            return
        except ValueError as exc:  # already registered
            self._broken(name, f"cannot register: {exc}")
            return
        impls = [i for i in self.pm.hook.register_attention.get_hookimpls() if i.plugin is plugin]
        found: list[AttentionBuilder] = []

        def register(builder: AttentionBuilder) -> None:
            if not isinstance(builder, AttentionBuilder) or not builder.name:
                raise TypeError(f"register() takes an AttentionBuilder with a name, got {builder!r}")
            found.append(builder)

        try:
            for impl in impls:
                impl.function(register=register)
        except Exception as exc:  # noqa: BLE001 - any plugin failure is reported, never fatal to the others
            self.pm.unregister(plugin)
            self._broken(name, f"register_attention failed: {type(exc).__name__}: {exc}")
            return
        if not impls:
            self.pm.unregister(plugin)
            hooks = sorted(n for n in dir(plugin) if n.startswith("register") and callable(getattr(plugin, n)))
            self._broken(name, "it implements no register_attention hook (a misspelled hook name, or a function "
                               "without @hookimpl?)" + (f"; found {', '.join(hooks)}" if hooks else ""))
            return
        if not found:
            self._broken(name, "its register_attention hook registered no builder (call register(builder))",
                         keep=True)
        for builder in found:
            builder.package = f"{package} {version}".strip()
            if builder.name in self.builders:
                other = self.builders[builder.name]
                raise PluginError(
                    f"two plugins claim the attention name '{builder.name}': "
                    f"{other.package} ({type(other).__module__}) and {builder.package} ({type(builder).__module__})"
                )
            self.builders[builder.name] = builder

    def _broken(self, name: str, message: str, keep: bool = False) -> None:
        """Record and warn about a plugin that does not work (``keep``: a warning only, it stays registered)."""
        if not keep:
            self.broken[name] = message
        warnings.warn(f"mla-registry plugin '{name}' was skipped: {message}", PluginLoadWarning, stacklevel=3)


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("mla_registry")
    pm.add_hookspecs(hookspecs)
    return pm


def discover() -> Registry:
    """Load every entry point of the ``mla_registry`` group, one at a time, into a fresh registry."""
    reg = Registry(_new_plugin_manager())
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        package = dist.name if dist else ep.value.split(".")[0]
        version = dist.version if dist else ""
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - import errors of one plugin must not stop the others
            reg._broken(ep.name, f"import of '{ep.value}' failed: {type(exc).__name__}: {exc}")
            continue
        reg.add_plugin(plugin, ep.name, package, version)
    return reg


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = discover()
    return _REGISTRY


def reset() -> None:
    """Forget the discovered plugins (tests that install a plugin call this)."""
    global _REGISTRY
    _REGISTRY = None


def get_builder(name: str, package_hint: str | None = None) -> AttentionBuilder:
    """Shortcut for ``get_registry().get(name)``."""
    return get_registry().get(name, package_hint)
