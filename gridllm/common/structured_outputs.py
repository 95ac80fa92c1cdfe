"""Structured outputs: constrain a completion to a JSON schema, a regex, a set of choices or
a grammar (vLLM's ``StructuredOutputsParams``, with its names).

Set one kind per request through ``SamplingParams(structured_outputs=...)``. The worker
compiles the grammar (xgrammar) once per distinct spec and masks every sampled token with
it; this module only describes and checks the request, so the router and the client need
no grammar engine.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, fields
from typing import Any

# The kinds, in the order vLLM lists them; exactly one is set.
KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Most characters of a spec (schema text, regex, grammar, all choices together): a grammar's
# compile time grows with it (tens of KiB compile in ~0.1-0.2 s), and it travels with every
# step the request is new in.
MAX_SPEC_CHARS = 1 << 18


@dataclass
class StructuredOutputsParams:
    """What the completion must match; exactly one of the first five fields is set.

    ``ValueError`` (naming the field, e.g. ``structured_outputs.choice``) for anything else.
    """

    # A JSON schema (a dict, or its JSON text) the completion must validate against.
    json: dict[str, Any] | str | None = None
    # A regular expression the whole completion must match.
    regex: str | None = None
    # The completion is exactly one of these strings.
    choice: list[str] | None = None
    # An EBNF grammar (xgrammar's dialect, GBNF-like) whose ``root`` rule the completion matches.
    grammar: str | None = None
    # Any JSON object (no schema).
    json_object: bool | None = None
    # JSON kinds: no whitespace between tokens (compact JSON) instead of any amount.
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json must be a JSON schema: {exc}.") \
                    from None
            if not isinstance(self.json, dict):
                raise ValueError("structured_outputs.json must be a JSON object (a schema), "
                                 f"got {type(self.json).__name__}.")
        if self.choice is not None:
            self.choice = list(self.choice)
        chosen = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}, "
                             f"got {chosen or 'none'}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"structured_outputs.{name} must not be empty.")
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs.choice must list at least one string.")
        num_chars = len(self.spec)
        if num_chars > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} must be at most {MAX_SPEC_CHARS} "
                             f"characters, got {num_chars}.")

    @property
    def kind(self) -> str:
        """Which of ``KINDS`` is set."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The set kind's value as text (the JSON schema serialised in its key order)."""
        kind = self.kind
        if kind == "json":
            return _json.dumps(self.json, ensure_ascii=False)
        if kind == "choice":
            return _json.dumps(self.choice, ensure_ascii=False)
        if kind == "json_object":
            return ""
        return getattr(self, kind)

    @property
    def cache_key(self) -> tuple[str, str, bool]:
        """Equal for requests that compile to the same grammar."""
        return self.kind, self.spec, self.disable_any_whitespace

    @classmethod
    def from_dict(cls, values: Any, field: str = "structured_outputs"
                  ) -> StructuredOutputsParams:
        """From a JSON body's object (vLLM's extra ``structured_outputs``); ValueError naming
        ``field`` and the key for an unknown key or a bad value."""
        if not isinstance(values, dict):
            raise ValueError(f"{field} must be an object, got {values!r}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{field}.{unknown[0]} is not a structured outputs field; "
                             f"known: {', '.join(sorted(known))}.")
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValueError as exc:
            message = str(exc)
            if field != "structured_outputs" and message.startswith("structured_outputs"):
                message = field + message[len("structured_outputs"):]
            raise ValueError(message) from None


def _check_types(params: StructuredOutputsParams) -> None:
    checks = {
        "json": (lambda v: v is None or isinstance(v, (dict, str)), "a JSON schema (an object "
                 "or its JSON text)"),
        "regex": (lambda v: v is None or isinstance(v, str), "a string"),
        "choice": (lambda v: v is None or (isinstance(v, (list, tuple))
                                           and all(isinstance(c, str) for c in v)),
                   "a list of strings"),
        "grammar": (lambda v: v is None or isinstance(v, str), "a string"),
        "json_object": (lambda v: v is None or isinstance(v, bool), "a bool"),
        "disable_any_whitespace": (lambda v: isinstance(v, bool), "a bool"),
    }
    for name, (check, allowed) in checks.items():
        value = getattr(params, name)
        if not check(value):
            raise StructuredOutputsTypeError(
                f"structured_outputs.{name} must be {allowed}, got {value!r}.")


class StructuredOutputsTypeError(TypeError, ValueError):
    """A field of the wrong type; to a service a bad argument (INVALID_ARGUMENT / HTTP 400)."""
