"""The pluggy hook specifications: the whole contract between mla-registry and its plugins.

A plugin is a module (or object) with functions marked ``@hookimpl``; it is found through the
``mla_registry`` entry-point group. The built-in ``mha``, ``gqa`` and ``mla`` plugins are found the same way.
"""

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("mla_registry")
hookimpl = pluggy.HookimplMarker("mla_registry")


@hookspec
def register_attention(register: Callable) -> None:
    """Register attention builders.

    Called once, when the registry first loads its plugins. Call ``register(builder)`` for each
    :class:`mla_registry.builder.AttentionBuilder` instance the plugin provides; ``builder.name`` is the
    attention-type name users write (``mla``, ``gqa``, ``my-variant``). Returns nothing. Two builders that
    claim one name are an error naming both providers.
    """
