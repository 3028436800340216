"""Error types whose message is the one line a user sees.

Every error a user can cause (bad config, bad bundle, unreadable image, bad CLI argument) is raised as an
`InspectorError` subclass carrying a message that names the file/field and what was expected. The CLIs catch
`InspectorError`, print `error: <message>` and exit with status 2; anything else is a bug and keeps its traceback.
"""


class InspectorError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(InspectorError):
    """A YAML config (or CLI option) is missing, malformed or out of range."""


class BundleError(InspectorError):
    """A model bundle is missing, incomplete, altered or of an unsupported format."""


class ImageError(InspectorError):
    """An image file could not be read or decoded."""


class DataError(InspectorError):
    """A training/evaluation folder is missing, empty or has no usable images."""


class BackendError(InspectorError):
    """An inference runtime could not be created or failed to run the model."""
