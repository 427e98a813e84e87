"""The package's one exception family.

Every error Headmaster raises on purpose derives from :class:`HeadmasterError`, carries a
message that says what was wrong and what to do, and is shown by the CLI without a traceback.
The client has its own family (:mod:`headmaster.client.errors`) so it can be used alone.
"""


class HeadmasterError(Exception):
    """Base class of every error Headmaster raises on purpose."""


class ExportError(HeadmasterError):
    """An encoder or head could not be exported, or its export failed verification."""


class UnsupportedHereError(HeadmasterError):
    """The request is valid but needs a runtime this machine lacks (TensorRT, a GPU, ...)."""


class CardError(HeadmasterError):
    """An encoder card or head metadata file is missing or malformed."""


class FingerprintMismatchError(HeadmasterError):
    """A head or stored embedding belongs to another encoder than the one in use."""


class ConfigError(HeadmasterError):
    """A Triton model description is invalid (the message names the field)."""


class RepositoryError(HeadmasterError):
    """A model repository is missing, malformed, or inconsistent."""


class ServerError(HeadmasterError):
    """The Triton server could not be started or stopped cleanly."""
