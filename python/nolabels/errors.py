"""The exceptions nolabels raises for problems the *user* can fix.

The command line prints these as one line (``nolabels CMD: error: ...``, exit status 2);
every other exception is a bug of ours and keeps its traceback. Each class also derives
from the built-in exception a caller would have caught before (``ValueError``,
``FileExistsError``, ``ImportError``, ``RuntimeError``), so ``except ValueError`` keeps
working.

    NolabelsError
    ├── InputError (ValueError)              bad argument, option or input file
    │   ├── CorruptFileError                 a file is not what it claims (truncated, wrong format)
    │   └── StoreMismatchError               an existing store/output was made differently
    ├── OutputExistsError (FileExistsError)  --out is not ours; refusing to overwrite or delete
    ├── IncompleteError (RuntimeError)       a store or job is not finished; re-run to resume
    ├── UnavailableError (RuntimeError)      weights, an endpoint or a backend cannot be used
    └── MissingDependencyError (ImportError) an optional extra is not installed
"""
from __future__ import annotations

import os


class NolabelsError(Exception):
    """Base class: a problem with the user's input, files or environment (not a bug)."""


class InputError(NolabelsError, ValueError):
    """A bad argument, option or input file."""


class CorruptFileError(InputError):
    """A file is not what it claims to be (truncated, wrong format, a pickle...)."""

    def __init__(self, path: str | os.PathLike, why: str) -> None:
        self.path, self.why = os.fspath(path), why
        super().__init__(f"{self.path}: {why}")

    def __reduce__(self):  # picklable (torchrun broadcasts errors from rank 0)
        return (type(self), (self.path, self.why))


class StoreMismatchError(InputError):
    """The store (or output) at this path was built from another model, input or setting."""


class OutputExistsError(NolabelsError, FileExistsError):
    """``--out`` exists and is not a nolabels output: nothing is overwritten or deleted."""


class IncompleteError(NolabelsError, RuntimeError):
    """A store or job is not finished; re-running the same command resumes it."""


class UnavailableError(NolabelsError, RuntimeError):
    """Weights, an endpoint or a backend that the call needs cannot be used here."""


class MissingDependencyError(NolabelsError, ImportError):
    """An optional dependency (a pip extra) is not installed."""


__all__ = ["NolabelsError", "InputError", "CorruptFileError", "StoreMismatchError",
           "OutputExistsError", "IncompleteError", "UnavailableError", "MissingDependencyError"]
