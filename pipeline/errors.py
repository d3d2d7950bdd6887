"""Named errors. Every message names the stage, key, file or value at fault."""


class LlmpipeError(Exception):
    """Base class of every error the orchestrator raises on purpose."""


class ConfigError(LlmpipeError):
    """The composed configuration is invalid (unknown key, wrong type, missing value...)."""


class DagError(LlmpipeError):
    """The stages' declared inputs and outputs do not form a valid graph."""


class CycleError(DagError):
    """Stages depend on each other in a loop."""


class MissingInputError(DagError):
    """A stage declares an input that no stage produces."""


class DuplicateProducerError(DagError):
    """Two stages declare the same output artifact."""


class OutputNotBuilt(LlmpipeError):
    """A stage output that a command needs has not been committed for the current config yet."""


class InputError(LlmpipeError):
    """Outside inputs that stages would read are missing, unreadable or not of the expected kind, found
    by ``plan``/``run`` before anything ran; ``problems`` holds one "<key>: <what is wrong>" per problem."""

    def __init__(self, header: str, problems: list[str]):
        super().__init__("\n  ".join([header, *problems]))
        self.problems = problems


class StageFailed(LlmpipeError):
    """A stage ran and failed; its partial output is kept for the next attempt."""

    def __init__(self, stage: str, reason: str, log_path: str | None = None):
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"stage '{stage}' failed: {reason}{where}")
        self.stage = stage
        self.reason = reason
        self.log_path = log_path


class LockTimeout(LlmpipeError):
    """Another run holds the lock on an output for longer than we are willing to wait."""


class SchedulerUnavailable(LlmpipeError):
    """The batch scheduler did not answer (a timeout, its controller down): try again later.

    Never a verdict on a job: the runner keeps following and asks again at its next poll.
    """
