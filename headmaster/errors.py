"""The package's one exception family.

Every error Headmaster raises on purpose derives from :class:`HeadmasterError` and carries a
message that says what was wrong. Library code names the parameter at fault in ``option``;
the command line turns it into the flag to change (``--target-precision``), so messages read
the same from Python and from a terminal. The client keeps a family of its own
(:mod:`headmaster.client.errors`) so it can be used without the rest of the package.
"""

from __future__ import annotations


class HeadmasterError(Exception):
    """Base class of every error Headmaster raises on purpose."""

    def __init__(self, message: str, *, option: str | None = None):
        super().__init__(message)
        self.option = option  # the parameter a caller changes to fix it, if one does


# -- what things are made of ------------------------------------------------------------------
class InvalidNameError(HeadmasterError):
    """A head name that cannot name a Triton model and its SCORES_<name> output."""


class CardError(HeadmasterError):
    """An encoder card or head metadata file is missing or malformed."""


class FingerprintMismatchError(HeadmasterError):
    """A head or stored embedding belongs to another encoder than the one in use."""


# -- export ---------------------------------------------------------------------------------------
class ExportError(HeadmasterError):
    """An encoder or head could not be exported, or its export failed verification."""


class UnsupportedHereError(HeadmasterError):
    """The request is valid but needs a runtime this machine lacks (TensorRT, a GPU, ...)."""


# -- the repository and the server ------------------------------------------------------------------
class ConfigError(HeadmasterError):
    """A Triton model description is invalid (the message names the field)."""


class RepositoryError(HeadmasterError):
    """A model repository is missing, malformed, or inconsistent."""


class InvalidVersionError(RepositoryError):
    """A head version that must not go live: its files disagree with each other or with the repository."""


class ForeignVersionError(InvalidVersionError, FingerprintMismatchError):
    """A head version made with another encoder than the repository's."""


class InconsistentRepositoryError(RepositoryError):
    """The repository on disk does not describe what can be served; `headmaster repo repair` fixes it."""


class ForeignHeadsRepositoryError(InconsistentRepositoryError, FingerprintMismatchError):
    """The repository holds heads of another encoder than the one it serves."""


class ServerError(HeadmasterError):
    """The Triton server could not be started, stopped, reached or told to load a model."""


class ToolError(HeadmasterError):
    """An external tool (perf_analyzer) is missing or failed."""


class LabelingToolError(ToolError):
    """A labelling tool's server (Label Studio) cannot be reached, refused the key, or lacks the project."""


# -- data, training, evaluation, the store ---------------------------------------------------------
class DataError(HeadmasterError):
    """Labelled data cannot make or measure a head; the message says what to change."""


class TrainingError(HeadmasterError):
    """Training settings that cannot train a head (kind, sizes, thresholds)."""


class EvalError(HeadmasterError):
    """The head cannot be evaluated on this holdout; the message says what to change."""


class StoreError(HeadmasterError):
    """The store cannot do what was asked; the message says why and what to do."""


# -- pipelines: backfill and queue workers ---------------------------------------------------------
class PipelineError(HeadmasterError):
    """A backfill or a queue worker cannot run as asked; the message says what to change."""


class QueueError(PipelineError):
    """The queue (broker) cannot be reached, or refused or timed out an operation."""
