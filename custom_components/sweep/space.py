"""``--space KEY=DISTRIBUTION:...``: one bundle key searched by Optuna, parsed and checked before any trial runs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import optuna

from custom_components.bundle import KeyValueError, parse_key_values

# distribution -> (what follows it, an example): the syntax named in every error message
KINDS = {
    "uniform": ("LOW:HIGH", "0:0.3"),
    "loguniform": ("LOW:HIGH (LOW > 0)", "1e-4:1e-2"),
    "int": ("LOW:HIGH (integers)", "1:4"),
    "choice": ("A,B,... (YAML values)", "[64,64,64],[96,96,96]"),
}
SYNTAX = ", ".join(f"KEY={kind}:{form}" for kind, (form, _) in KINDS.items())

Scalar = None | bool | int | float | str  # what Optuna stores as a categorical choice


class SweepError(ValueError):
    """A request the sweep cannot run; the message names the option and the fix."""


def stored(value: Any) -> Scalar:
    """A choice as Optuna stores it: a scalar as is, a list or mapping as its JSON text (Optuna needs scalars)."""
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)


@dataclass(frozen=True)
class Space:
    """One searched key: ``uniform``/``loguniform``/``int`` between ``low`` and ``high``, or one of ``choices``."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    @property
    def text(self) -> str:
        """The argument in one canonical form (the study records it; equal spaces have equal texts)."""
        if self.kind == "choice":
            return f"{self.key}=choice:" + ",".join(json.dumps(value, separators=(",", ":")) for value in self.choices)
        return f"{self.key}={self.kind}:{self.low!r}:{self.high!r}"

    @property
    def options(self) -> list[Scalar]:
        """The choices as the trials store them (see :func:`stored`)."""
        return [stored(value) for value in self.choices]

    def candidates(self) -> list[Any]:
        """Values the bundle must accept before the sweep starts: both bounds, or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def suggest(self, trial: optuna.Trial) -> Any:
        """The value of this key for ``trial`` (a choice converted back from its stored form)."""
        if self.kind == "choice":
            return self.choices[self.options.index(trial.suggest_categorical(self.key, self.options))]
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")


def _bad(argument: str, problem: str) -> SweepError:
    return SweepError(f"--space {argument}: {problem}")


def _choices(argument: str, key: str, text: str) -> tuple[Any, ...]:
    """``A,B,...`` read as the YAML list ``[A,B,...]``, the way ``--set`` reads a value."""
    example = f"{key}=choice:{KINDS['choice'][1]} (two lists) or {key}=choice:adamw,sgd (two strings)"
    try:
        choices = parse_key_values([f"{key}=[{text}]"], option="--space")[key]
    except KeyValueError:
        raise _bad(argument, f"{text!r} is not YAML values separated by commas; write e.g. {example}") from None
    if not choices:
        raise _bad(argument, f"no choices given; write e.g. {example}")
    if len(set(map(stored, choices))) < len(choices):
        raise _bad(argument, "a choice is given twice; give each once")
    return tuple(choices)


def _bounds(argument: str, key: str, kind: str, text: str) -> tuple[float, float]:
    form, example = KINDS[kind]
    parts = text.split(":")
    number = int if kind == "int" else float
    try:
        low, high = (number(part) for part in parts)
    except ValueError:
        raise _bad(argument, f"{kind} takes {form}, e.g. {key}={kind}:{example}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise _bad(argument, f"LOW must be below HIGH (both finite), e.g. {key}={kind}:{example}")
    if kind == "loguniform" and low <= 0:
        raise _bad(argument, f"loguniform needs LOW > 0, e.g. {key}=loguniform:{example}; or use uniform")
    return low, high


def parse_space(argument: str) -> Space:
    """``KEY=uniform:LOW:HIGH``, ``KEY=loguniform:LOW:HIGH``, ``KEY=int:LOW:HIGH`` or ``KEY=choice:A,B,...``
    (YAML values separated by commas at the top level: ``choice:[64,64,64],[96,96,96]`` is two lists)."""
    key, separator, spec = argument.partition("=")
    key = key.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if not separator or not key:
        raise _bad(argument, f"write {SYNTAX}")
    if kind not in KINDS:
        raise _bad(argument, f"unknown distribution {kind!r}: write {SYNTAX}")
    if kind == "choice":
        return Space(key, kind, choices=_choices(argument, key, rest))
    low, high = _bounds(argument, key, kind, rest)
    return Space(key, kind, low, high)
