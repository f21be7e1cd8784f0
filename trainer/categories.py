"""Which category each class index of a network means, carried in its checkpoints and matched by name.

A network's class i is the i-th category of its training file in id order. Another file with the same names under
other ids (re-exported by another tool) orders them differently, so class indices alone would silently mean other
categories: a teacher would teach the wrong classes and an evaluation would score against the wrong ones.
Checkpoints record `categories` ([{"id", "name"}] in class order, from the run directory's categories.json); a
network meeting another file is matched by name: the same names in another order are mapped (`permutation`), other
names are refused. Checkpoints written before this carry none and are taken in the file's order, with a warning.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

CLS_KEYS = ("head.cls_logits.weight", "head.cls_logits.bias")  # the one layer whose rows are the classes


class CategoryMismatch(ValueError):
    """A network's categories are not those of the file it meets."""


def names(categories: Sequence[dict]) -> list[str]:
    return [str(c.get("name", c.get("id"))) for c in categories]


def permutation(held: Optional[Sequence[dict]], wanted: Sequence[dict], what: str,
                warn: bool = True) -> Optional[list[int]]:
    """How `held` (a checkpoint's categories, class order) maps onto `wanted` (a file's): `order` with
    held[order[j]] the category named like wanted[j], or None when they are already in the same order. Raises
    `CategoryMismatch` naming the differences; warns (and returns None) when `held` is None (an old checkpoint)."""
    if held is None:
        if warn:
            print(f"warning: {what} records no categories (written before they were kept); its classes are taken "
                  "in the order of the file's category ids", file=sys.stderr)
        return None
    have, want = names(held), names(wanted)
    if have == want:
        return None
    if sorted(have) != sorted(want) or len(set(want)) != len(want):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        detail = "; ".join(part for part in (f"the file has {missing} that it lacks" if missing else "",
                                             f"it has {extra} that the file lacks" if extra else "") if part)
        raise CategoryMismatch(f"{what}: its categories are not the file's ({detail or 'repeated names'}); "
                               "train it on this labelling or use a file with its categories")
    return [have.index(name) for name in want]


def permute_classes(state: dict, order: Optional[list[int]]) -> dict:
    """A network state dict whose class rows follow `order` (see `permutation`); the state itself when None."""
    if order is None:
        return state
    return state | {key: state[key].index_select(0, torch.as_tensor(order)) for key in CLS_KEYS}
