"""The client's own exception family, independent of the server-side package.

Every error names what was wrong; :class:`InvalidInputError` is the one a caller can fix by
changing the input, :class:`ServerUnavailableError` and :class:`RequestTimeoutError` the
ones worth retrying.
"""


class ClientError(Exception):
    """Base of every error the Headmaster client raises."""


class ServerUnavailableError(ClientError):
    """No Triton server answers at that address, or it is not ready."""


class ModelNotFoundError(ClientError):
    """The server answers but does not serve the model asked for."""


class InvalidInputError(ClientError):
    """The server refused the input (HTTP 400 / gRPC INVALID_ARGUMENT): a corrupt image, say."""


class RequestTimeoutError(ClientError):
    """No answer within the client's timeout."""


class ServerSideError(ClientError):
    """The server failed while answering (HTTP 500 / gRPC INTERNAL)."""
