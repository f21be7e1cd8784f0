"""CoLAD's role policy: who teaches, parsed once from its name into one type (no torch).

    auto          the paper's criterion: per (image, GT, level) the network whose candidate losses are the more
                  spread out (std/mean) assigns
    pin-a, pin-b  one network assigns everything
    alternate:N   A assigns for steps [0, N), B for [N, 2N), and so on (N >= 1)

The same name travels in configs (`colearn.policy`), REST bodies, `control/roles.json`, checkpoints and metrics;
between data-parallel ranks it travels as one int (`code`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, WithJsonSchema

# The grammar (.match anchors the start). N of alternate:N has at most 9 digits: it travels as an int64 code.
POLICY_PATTERN = r"(auto|pin-a|pin-b|alternate:[1-9][0-9]{0,8})"
POLICY_RE = re.compile(POLICY_PATTERN + r"\Z")
_CODES = {"auto": 0, "pin-a": -1, "pin-b": -2}  # alternate:N is N (>= 1)


@dataclass(frozen=True)
class RolePolicy:
    """A valid role policy. `RolePolicy(name)` and `RolePolicy.parse(name)` both validate."""
    name: str

    def __post_init__(self):
        if not isinstance(self.name, str) or not POLICY_RE.match(self.name):
            raise ValueError(f"unknown role policy {self.name!r}: use auto, pin-a, pin-b or alternate:N")

    @classmethod
    def parse(cls, name: "str | RolePolicy") -> "RolePolicy":
        return name if isinstance(name, RolePolicy) else cls(name)

    @property
    def period(self) -> Optional[int]:
        """N of `alternate:N`, else None."""
        return int(self.name.split(":", 1)[1]) if self.name.startswith("alternate:") else None

    def pinned(self, step: int) -> Optional[Literal["a", "b"]]:
        """'a' or 'b' when one network teaches everything at this step (counted from 0); None for the per-object
        criterion (`auto`)."""
        if self.name == "pin-a":
            return "a"
        if self.name == "pin-b":
            return "b"
        if self.period is not None:
            return "b" if (step // self.period) % 2 else "a"
        return None

    @property
    def code(self) -> int:
        """The policy as one int: auto 0, pin-a -1, pin-b -2, alternate:N N."""
        return _CODES[self.name] if self.name in _CODES else int(self.period)

    @classmethod
    def from_code(cls, code: int) -> "RolePolicy":
        """Inverse of `code`."""
        code = int(code)
        for name, c in _CODES.items():
            if c == code:
                return cls(name)
        if code < 1:
            raise ValueError(f"unknown role policy code {code}: use 0 (auto), -1 (pin-a), -2 (pin-b) or N >= 1 "
                             "(alternate:N)")
        return cls(f"alternate:{code}")

    def __str__(self) -> str:
        return self.name


def _valid_name(v: str) -> str:
    try:
        return RolePolicy.parse(v).name
    except ValueError:
        raise ValueError("must be one of auto, pin-a, pin-b, alternate:N (N a positive integer below 10^9)") from None


# A policy field of a config or REST body: our one-line message on a bad name; the grammar in its JSON schema.
PolicyName = Annotated[str, AfterValidator(_valid_name),
                       WithJsonSchema({"type": "string", "pattern": f"^{POLICY_PATTERN}$"})]
