"""Exception types. Every message names the file, key or value at fault."""


class MlaRegistryError(Exception):
    """Base class of every error this package raises on purpose."""


class PluginError(MlaRegistryError):
    """A plugin is missing, broken, or two plugins claim the same name."""


class KwargError(MlaRegistryError, ValueError):
    """A builder kwarg is unknown, of the wrong type, or outside its allowed values."""


class SlotError(MlaRegistryError):
    """A slot selection matches nothing, or names a slot the model does not have."""


class CheckpointError(MlaRegistryError):
    """A checkpoint directory is incomplete, from a newer format, or does not match its weights."""


class ModelRefError(MlaRegistryError):
    """A model reference (hub id, directory, bundled:NAME) cannot be resolved."""


class DataError(MlaRegistryError):
    """A dataset reference or an audio file cannot be read."""


class ExperimentError(MlaRegistryError):
    """An experiments YAML file is invalid."""


class HostInterfaceError(MlaRegistryError):
    """The installed transformers calls attention modules in a way this mla-registry does not know."""


class InstallError(MlaRegistryError):
    """A dependency is missing or cannot load (an installation problem, never the user's data)."""


class ExportError(MlaRegistryError):
    """A checkpoint cannot be written in the format asked for (a plugin with no stock form, a missing runtime)."""
