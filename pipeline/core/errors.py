"""Error types. Each says what went wrong and what to do about it."""


class CxrAuditError(Exception):
    """Base class for errors the user can act on."""


class ConfigError(CxrAuditError):
    """A flag, profile or configuration value is wrong."""


class MissingExtraError(ConfigError):
    """The chosen model needs an optional dependency (a pip extra) that is not installed."""


class ClusterStartError(CxrAuditError):
    """The cluster brought up no worker in time (no sbatch, no quota, an image that cannot be pulled)."""


class DatasetError(CxrAuditError):
    """A dataset location or its metadata cannot be used at all."""


class CheckpointError(CxrAuditError):
    """A checkpoint cannot be loaded into the requested architecture."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs unpickling arbitrary code; we refuse by default."""


class OutputError(CxrAuditError):
    """The output location cannot be written, or holds an incompatible run."""


class MisalignedWriteError(OutputError):
    """A Zarr region write does not match the chunk grid (a shard would touch a neighbour's chunk)."""


class ImageError(CxrAuditError):
    """One image could not be read or decoded. Recorded in errors.parquet; never stops the job."""

    def __init__(self, stage: str, cause: BaseException | str, error_class: str | None = None):
        self.stage = stage
        self.cause = cause
        self.error_class = error_class or (type(cause).__name__ if isinstance(cause, BaseException) else "ImageError")
        super().__init__(f"{stage}: {self.error_class}: {cause}")

    def __reduce__(self):  # crosses process boundaries (decode workers) intact
        return type(self), (self.stage, self.cause, self.error_class)


class ResourceLimitError(ConfigError):
    """The process's limits (ulimit) rule the job out before it starts."""


# What the interpreter or a native library says when memory or address space runs out: an import's
# mmap (torch, scipy: "failed to map segment"), a thread's stack, a plain allocation.
_OUT_OF_MEMORY = ("failed to map segment", "can't start new thread", "cannot allocate memory", "out of memory")


def out_of_memory(e: BaseException) -> str | None:
    """An actionable sentence when ``e`` is the process running out of memory, else None."""
    text = str(e).lower()
    if not (isinstance(e, MemoryError) or any(s in text for s in _OUT_OF_MEMORY)):
        return None
    return (f"out of memory ({type(e).__name__}: {str(e)[:160]}). The job needs more memory or address space than this "
            "process may use: check `ulimit -v` and the machine's free memory, or score with fewer --decode-workers and a "
            "smaller --batch-size; finished shards are kept, so rerun the same command once it has room")
