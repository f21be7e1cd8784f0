"""The training modes, in one table: who assigns the student's hard labels, and what else it learns from.

    mode   assigner   hard  teacher_hard  soft  needs_teacher
    paa    student    yes   -             -     -              the baseline: the student assigns itself
    lad    teacher    yes   yes           -     yes            a frozen teacher's PAA assignment (the paper)
    kd     None       -     -             yes   yes            soft-label distillation only, no GT loss
    solad  teacher    yes   yes           yes   yes            lad + kd
    colad  pair       yes   -             -     -              networks A and B train together; per (image, GT,
                                                               level) the role policy picks whose losses assign

Everything that depends on the mode (config validation, the training step, the stream's columns, the assigner
service) reads this table rather than spelling mode names. No torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Assigner = Literal["student", "teacher", "pair"]


@dataclass(frozen=True)
class ModeSpec:
    name: str
    assigner: Optional[Assigner]  # who assigns the student's hard labels (None: no hard labels)
    hard: bool                    # the student trains on a PAA hard assignment (detection loss on GT)
    teacher_hard: bool            # ... made by the frozen teacher (the assigner service can make it)
    soft: bool                    # the student learns the frozen teacher's soft labels (KD loss)
    needs_teacher: bool           # a frozen teacher checkpoint is part of the run

    @property
    def co_learning(self) -> bool:
        """Two networks trained together, each assigning for the other (CoLAD)."""
        return self.assigner == "pair"

    @property
    def networks(self) -> tuple[str, ...]:
        """The networks a run of this mode trains."""
        return ("a", "b") if self.co_learning else ("a",)


MODE_SPECS: tuple[ModeSpec, ...] = (
    ModeSpec("paa", "student", hard=True, teacher_hard=False, soft=False, needs_teacher=False),
    ModeSpec("lad", "teacher", hard=True, teacher_hard=True, soft=False, needs_teacher=True),
    ModeSpec("kd", None, hard=False, teacher_hard=False, soft=True, needs_teacher=True),
    ModeSpec("solad", "teacher", hard=True, teacher_hard=True, soft=True, needs_teacher=True),
    ModeSpec("colad", "pair", hard=True, teacher_hard=False, soft=False, needs_teacher=False),
)
MODES: tuple[str, ...] = tuple(m.name for m in MODE_SPECS)
_BY_NAME = {m.name: m for m in MODE_SPECS}


def mode_spec(name: str) -> ModeSpec:
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mode {name!r}: use {', '.join(MODES)}") from None


def modes_where(flag: str) -> tuple[str, ...]:
    """Names of the modes whose `flag` (a field or property of ModeSpec) is true, in table order."""
    return tuple(m.name for m in MODE_SPECS if getattr(m, flag))
