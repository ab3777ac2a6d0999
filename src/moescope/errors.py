"""The package's exceptions.

Every error a user can cause (a bad file, a bad flag value, an inconsistent trace) is a
`MoescopeError`. Its message is one line: the value seen, what was expected, and the fix.
The CLI turns these into that line on stderr and exit code 2; library code only raises.

    >>> raise TraceError("layer 3 has expert id 71 but the trace declares 64 experts; ...")
"""

from __future__ import annotations


class MoescopeError(Exception):
    """Base class of every error moescope raises on bad input (CLI exit code 2)."""


class TraceError(MoescopeError, ValueError):
    """A trace or counts array that breaks the data model (ids out of range, bad shapes...)."""


class FormatError(MoescopeError, ValueError):
    """An input file that is not in the format its reader expects."""


class UsageError(MoescopeError, ValueError):
    """A bad combination of options or an option value out of range."""


class OutputExistsError(MoescopeError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class CaptureError(MoescopeError, ValueError):
    """A model moescope cannot capture from or run (no MoE router found, router output unreadable, a model
    llama.cpp cannot load, bad folder)."""


class MissingDependencyError(MoescopeError, ImportError):
    """An optional backend (torch, transformers, ...) is needed but not installed."""


def require(module: str, extra: str, purpose: str):
    """Import an optional backend lazily, or raise a `MissingDependencyError` naming the extra.

    Parameters
    ----------
    module : the module to import, e.g. ``"torch"``.
    extra : the moescope extra that installs it, e.g. ``"hf"``.
    purpose : what needs it, for the message, e.g. ``"reading SGLang .pt dumps"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {module!r}, which is not installed; "
            f"install it with: pip install 'moescope[{extra}]'"
        ) from exc
