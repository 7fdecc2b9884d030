"""One-line errors for every ``protoseg`` command: :func:`handle_errors`.

Its own module so that the commands defined outside :mod:`cli.main` (compare, maps, merge,
the framework exporters), which :mod:`cli.main` imports, can use it at import time.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from engine.errors import cli_messages

__all__ = ["handle_errors"]

# Errors that are the user's to fix: shown as one line, exit 1.
_DOMAIN_ERRORS = (ValueError, TypeError, KeyError, LookupError, FileNotFoundError,
                  FileExistsError, PermissionError, ImportError, OSError, RuntimeError)


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    msg = " ".join(str(msg).split())
    return msg or type(exc).__name__


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn domain errors into one-line ClickExceptions unless ``--debug`` was given."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool((ctx.find_root().obj or {}).get("debug"))
        try:
            with cli_messages():  # engine advice names flags, not Python keywords
                return func(*args, **kwargs)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted: the batches already finished are kept; run the same command "
                       "again to resume", err=True)
            ctx.exit(130)
        except click.ClickException:
            raise
        except _DOMAIN_ERRORS as exc:
            if debug:
                raise
            raise click.ClickException(_one_line(exc)) from None
        except MemoryError as exc:  # the scoring loop's OutOfMemoryError names batch and remedy
            if debug:
                raise
            from engine.errors import OutOfMemoryError

            if isinstance(exc, OutOfMemoryError):
                raise click.ClickException(_one_line(exc)) from None
            raise click.ClickException(f"out of memory ({_one_line(exc)}): lower --batch-size or "
                                       "--max-memory, or score fewer --layers") from None

    return wrapper
