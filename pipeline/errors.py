"""The one error type for bad user data.

Users train on their own COCO files. A bad entry must surface as ONE message that says which file,
which entry (image id / annotation id), which field, what is wrong and what to do -- never as a
KeyError from deep inside pycocotools or a DataLoader worker.
"""

from __future__ import annotations

import functools
from typing import Any


class DatasetError(ValueError):
    """Bad input data, with a message that names the file, the entry, the field, the reason and the fix.

    `DatasetError(reason, file=..., image_id=..., annotation_id=..., field=..., fix=...)`.
    Constructing it from a single already-formatted message also works (and keeps that message as is):
    torch's DataLoader re-raises worker exceptions that way, and the message then already names the file.
    """

    def __init__(self, reason: str, *, file: Any = None, image_id: Any = None, annotation_id: Any = None,
                 category_id: Any = None, field: str | None = None, fix: str | None = None) -> None:
        self.reason, self.file, self.fix = reason, None if file is None else str(file), fix
        self.image_id, self.annotation_id, self.category_id, self.field = image_id, annotation_id, category_id, field
        super().__init__(self._format())

    def _format(self) -> str:
        parts = {"image id": self.image_id, "annotation id": self.annotation_id, "category id": self.category_id,
                 "field": None if self.field is None else f"'{self.field}'"}
        where = ", ".join(f"{name} {value}" for name, value in parts.items() if value is not None)
        text = f"{where}: {self.reason}" if where else self.reason
        if self.file is not None:
            text = f"{self.file}: {text}"
        return f"{text}. Fix: {self.fix}" if self.fix else text

    def details(self) -> dict[str, Any]:
        """The structured parts, e.g. for a REST error body (message plus field at fault)."""
        return {"reason": self.reason, "file": self.file, "image_id": self.image_id,
                "annotation_id": self.annotation_id, "category_id": self.category_id, "field": self.field,
                "fix": self.fix}

    def __reduce__(self):
        # Keep the structured fields across pickling (Ray tasks, DataLoader workers).
        return functools.partial(type(self), **self.details()), ()


class RunLost(RuntimeError):
    """A run lost a process (a training worker, the stream's monitor, the co-learning coordinator) more often
    than `pipeline.max_failures` allows. Its last checkpoint is whole (written atomically): the message says
    which file, and running the same command again resumes from it."""
