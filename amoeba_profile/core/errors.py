"""One exception family so the CLI can map every failure to a one-line message and an exit code."""


class AmoebaError(Exception):
    """Base of every error the toolkit raises on purpose; the message is one actionable line."""

    exit_code = 1


class UsageError(AmoebaError):
    """The caller asked for something malformed (bad option value, unknown model name)."""

    exit_code = 2


class ArchError(UsageError):
    """A model architecture is unknown or its config is unsupported; the message names the field."""


class UnsupportedShape(AmoebaError):
    """A subnet shape that a backend or the design space cannot express."""


class BackendUnavailable(AmoebaError):
    """A backend whose library or hardware is missing; the message carries the install hint."""


class ArtifactError(AmoebaError):
    """A cached compiled engine that cannot be used (unreadable or malformed); the message names the
    file and the cache entry to delete, since rerunning alone would read it again."""


class LutError(AmoebaError):
    """A latency table that is missing, malformed or incompatible; the message names file and row."""


class OutOfRange(AmoebaError):
    """A prediction that would need extrapolation beyond the measured grid."""


class InfeasibleBudget(AmoebaError):
    """No shape fits the budget; the message names the fastest shape and its latency."""


class MachineBusy(AmoebaError):
    """The machine is busy (other processes, or another measurement holding it) and the caller chose
    not to measure on it; the message says who or what and how to proceed."""
