"""Errors a user can act on: each carries a one-line cause and the fix."""

from __future__ import annotations


class QuantkitError(Exception):
    """Base class: `str(err)` is the cause, `err.hint` says what to do about it. `retryable`: the same command
    may succeed later unchanged (the network failed), so a worker queues its job again."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "", *, retryable: bool = False) -> None:
        super().__init__(message)
        self.hint = hint
        self.retryable = retryable


class SourceError(QuantkitError):
    """The checkpoint cannot be used: not found, incomplete, unsafe or unsupported."""

    exit_code = 3


class ChatTemplateError(QuantkitError):
    """A chat template given to `quantkit retemplate` (a file, or a source revision's) cannot be used."""

    exit_code = 4


class ProfileError(QuantkitError):
    """A profile names something quantkit cannot build."""

    exit_code = 4


class DiskSpaceError(QuantkitError):
    """The output folder cannot take the build: not enough space, or not writable."""

    exit_code = 5


class BuildFolderError(QuantkitError):
    """The build folder's record cannot be used: written by a newer quantkit, or not a quantkit manifest."""

    exit_code = 5


class NotEnoughMemory(QuantkitError):
    """A step of the build needs more memory than the machine (or the largest Ray node) has."""

    exit_code = 5


class ToolError(QuantkitError):
    """llama.cpp (converter, quantizer, runtime) failed or is missing."""

    exit_code = 6


class ClusterError(QuantkitError):
    """A Ray cluster cannot run the build: a step no node can take, a node that fails its preflight, a node lost
    more often than a step may be retried. Lost nodes and crashed workers are `retryable`: a job is queued again."""

    exit_code = 9


class QueueError(QuantkitError):
    """The job queue cannot be opened: a PostgreSQL URL that is malformed, a server that refuses, a wrong password."""

    exit_code = 10


class SmokeTestFailed(QuantkitError):
    exit_code = 7


class QualityGateFailed(QuantkitError):
    """An artifact broke its chat template or stop tokens, or a quality bound of the profile."""

    exit_code = 7
