"""Every error class of accel derives from ``accel.AccelError`` and keeps its built-in base."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import accel


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(accel.__path__, prefix="accel."):
        if info.name.endswith(".__main__"):  # runs the command line
            continue
        module = importlib.import_module(info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(value, BaseException)
                and value.__module__ == info.name
                and value is not accel.AccelError
            ):
                found.append(value)
    return found


EXCEPTIONS = _exception_classes()
ERRORS = [e for e in EXCEPTIONS if issubclass(e, Exception)]


def test_the_only_exceptions_that_are_not_errors_are_the_command_lines_stop() -> None:
    # Control flow, not errors: the SystemExit a stopped command raises (it notices being swallowed).
    others = {f"{e.__module__}.{e.__name__}" for e in EXCEPTIONS if not issubclass(e, Exception)}
    assert others == {"accel.cli.app._Stop"}


def test_every_error_class_is_found() -> None:
    names = {e.__name__ for e in ERRORS}
    assert {"SettingsError", "PlanError", "EngineError", "LaunchError", "RequestError"} <= names
    assert len(ERRORS) >= 17


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: f"{e.__module__}.{e.__name__}")
def test_error_is_an_accel_error_and_a_builtin_error(error: type[BaseException]) -> None:
    assert issubclass(error, accel.AccelError)
    # The built-in base that `except ValueError:` / `except RuntimeError:` clauses rely on.
    assert issubclass(error, ValueError | RuntimeError | TypeError)


def test_one_clause_catches_them() -> None:
    with pytest.raises(accel.AccelError):
        accel.AccelSettings(devices=3)
    with pytest.raises(ValueError):
        accel.AccelSettings(strategy="pipe")
