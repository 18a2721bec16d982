"""Errors that cross module boundaries and map to exit codes in the CLI."""


class TrackingUnavailable(Exception):
    """The tracking server did not answer (exit 1)."""


class TrackingRefused(Exception):
    """The tracking server refused the credentials or the permission (exit 1)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT: the run is marked KILLED and the process exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.exit_code = 128 + signum


class StepFailed(Exception):
    """A study's step ended without a result; the study names it (exit 1)."""

    def __init__(self, step: str, reason: str):
        super().__init__(f"step {step} failed: {reason}")
