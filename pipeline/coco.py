"""Read and validate a COCO "instances" file into training records plus a pycocotools object for evaluation.

Why validate before pycocotools: pycocotools trusts its input and fails late and vaguely (a KeyError in
createIndex, a wrong AP, a crash in a DataLoader worker hours into a run). Users bring their own files, so
every structural problem is reported up front as one DatasetError naming the file, the entry, the field,
the reason and the fix. Problems that are common and harmless are repaired and counted instead:
boxes reaching outside the image are clipped, boxes with nothing left after clipping are dropped, crowd
regions are kept for evaluation only, and images without annotations stay in as negatives.

The pycocotools object (`CocoDataset.coco`) holds the SAME cleaned boxes the trainer sees (clipped, dropped
ones removed), so evaluation measures what was trained for.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
from pycocotools.coco import COCO

from pipeline.errors import DatasetError
from schemas.storage import Location

REQUIRED_KEYS = ("images", "annotations", "categories")
MIN_BOX_SIZE = 1.0  # pixels; a clipped box thinner than this carries no trainable signal
MAX_LISTED_MISSING = 5


@dataclass
class ImageRecord:
    """One training image: where it is and its boxes (xyxy absolute pixels) with contiguous labels."""

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [G, 4] x1, y1, x2, y2
    labels: np.ndarray  # int64 [G], 0..C-1


@dataclass
class LoadReport:
    """What loading did to the data, so silent repairs are never silent."""

    file: str
    images: int = 0
    annotations: int = 0  # in the file, crowd included
    boxes: int = 0  # kept for training
    clipped: int = 0
    dropped_degenerate: int = 0
    dropped_outside: int = 0
    crowd: int = 0
    negatives: int = 0  # images with no training box
    renumbered_annotation_ids: bool = False

    @property
    def repaired(self) -> bool:
        return bool(self.clipped or self.dropped_outside or self.dropped_degenerate or self.crowd
                    or self.renumbered_annotation_ids)

    def summary(self) -> str:
        lines = [f"{self.file}: {self.images} images ({self.negatives} without objects), "
                 f"{self.annotations} annotations -> {self.boxes} training boxes"]
        repairs = [
            (self.clipped, "clipped to the image"),
            (self.dropped_outside, "dropped: entirely outside the image"),
            (self.dropped_degenerate, f"dropped: under {MIN_BOX_SIZE:g} px wide or high after clipping"),
            (self.crowd, "crowd (iscrowd=1): ignored for training, kept as ignore regions for evaluation"),
        ]
        lines += [f"  {count} {what}" for count, what in repairs if count]
        if self.renumbered_annotation_ids:
            lines.append("  annotation ids renumbered from 1 (pycocotools treats id 0 as 'unmatched')")
        return "\n".join(lines)


@dataclass
class CocoDataset:
    """A validated COCO file: records for training, `coco` for evaluation, and the category mapping."""

    coco: COCO
    records: list[ImageRecord]
    categories: list[dict]  # in contiguous order: categories[i] has label i
    cat_ids: list[int]  # contiguous label -> COCO category id
    report: LoadReport

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def in_class_order(self, held: list[dict] | None, what: str) -> CocoDataset:
        """This file scored in the class order of `held` (a network's categories, `trainer.categories`): class i
        maps to this file's id of the category named like held[i], so a file that numbers the same categories
        otherwise is scored right; other names raise `CategoryMismatch` (None: an old checkpoint, file order)."""
        from trainer.categories import names, permutation

        if permutation(held, self.categories, what) is None:
            return self
        id_of = dict(zip(names(self.categories), self.cat_ids))
        return replace(self, cat_ids=[id_of[name] for name in names(held)])


# ---------------------------------------------------------------------------------------------- reading


def _read_json(path: str) -> dict:
    try:
        data = json.loads(Location(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DatasetError("annotation file not found", file=path, fix="check the path") from None
    except IsADirectoryError:
        raise DatasetError("is a folder, not a COCO JSON file", file=path, fix="pass the .json file") from None
    except OSError as e:
        raise DatasetError(f"cannot read the file ({e.strerror or e})", file=path,
                           fix="check its permissions, or the store's endpoint and credentials") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text (byte {e.start})", file=path,
                           fix="save the annotation file as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}", file=path,
                           fix="repair the JSON syntax there (a truncated download or a trailing comma are common "
                           "causes)") from None
    if not isinstance(data, dict):
        raise DatasetError(f"top level is a JSON {type(data).__name__}, expected an object with "
                           f"{', '.join(REQUIRED_KEYS)}", file=path,
                           fix="pass a COCO instances file (e.g. instances_train2017.json)")
    return data


def _check_top_level(data: dict, path: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetError(f"missing top-level key(s) {missing}; a COCO instances file needs {list(REQUIRED_KEYS)}",
                           file=path, field=missing[0], fix="add the key (an empty list is allowed for 'annotations')")
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DatasetError(f"must be a list, got {type(data[key]).__name__}", file=path, field=key,
                               fix=f"make '{key}' a list")


# ---------------------------------------------------------------------------------------------- checks
# Each checker yields one DatasetError per problem; the loader raises the first and says how many more.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_size(v: Any) -> int | None:
    """A positive integral width/height (640 or 640.0), else None."""
    if _is_number(v) and math.isfinite(v) and v > 0 and float(v).is_integer():
        return int(v)
    return None


def _category_problems(categories: list, path: str) -> Iterator[DatasetError]:
    seen = set()
    for pos, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            yield DatasetError(f"categories[{pos}] has no integer 'id'", file=path, field="id",
                               fix="give every category an integer id")
            continue
        if cat["id"] in seen:
            yield DatasetError("duplicate category id", file=path, category_id=cat["id"], field="id",
                               fix="make category ids unique")
        seen.add(cat["id"])
        if not isinstance(cat.get("name"), str):
            yield DatasetError("missing or non-string 'name'", file=path, category_id=cat["id"], field="name",
                               fix="name the category")
    if not categories:
        yield DatasetError("no categories", file=path, field="categories", fix="list at least one category")


def _image_problems(images: list, path: str) -> Iterator[DatasetError]:
    seen = set()
    for pos, image in enumerate(images):
        if not isinstance(image, dict):
            yield DatasetError(f"images[{pos}] is not an object", file=path, field="images")
            continue
        image_id = image.get("id")
        if not _is_int(image_id) or not 0 <= image_id < 2 ** 53:  # detections carry ids as float64 (pycocotools)
            yield DatasetError(f"images[{pos}] has no integer 'id' from 0 to 2**53 - 1 (got {image_id!r})", file=path,
                               field="id", fix="give every image a unique non-negative integer id below 2**53")
            continue
        if image_id in seen:
            yield DatasetError("duplicate image id", file=path, image_id=image_id, field="id",
                               fix="make image ids unique")
        seen.add(image_id)
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            yield DatasetError(f"missing or empty 'file_name' (got {name!r})", file=path, image_id=image_id,
                               field="file_name", fix="set file_name to the image path relative to image_root")
        for key in ("width", "height"):
            if _positive_size(image.get(key)) is None:
                yield DatasetError(f"missing or not a positive integer (got {image.get(key)!r})", file=path,
                                   image_id=image_id, field=key, fix=f"set '{key}' to the image's size in pixels")


def _bbox_problem(bbox: Any) -> tuple[str, str] | None:
    """(field, reason) if `bbox` is not [x, y, w, h] of finite numbers with w, h > 0."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "bbox", f"must be a list of 4 numbers [x, y, width, height], got {bbox!r}"
    for i, v in enumerate(bbox):
        if not _is_number(v) or not math.isfinite(v):
            return f"bbox[{i}]", f"must be a finite number, got {v!r} in {bbox!r}"
    if bbox[2] <= 0:
        return "bbox[2] (width)", f"width must be > 0, got {bbox[2]!r} in {bbox!r}"
    if bbox[3] <= 0:
        return "bbox[3] (height)", f"height must be > 0, got {bbox[3]!r} in {bbox!r}"
    return None


def _annotation_problems(annotations: list, image_ids: set[int], cat_ids: set[int],
                         path: str) -> Iterator[DatasetError]:
    seen = set()
    for pos, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            yield DatasetError(f"annotations[{pos}] is not an object", file=path, field="annotations")
            continue
        ann_id = ann.get("id")
        if not _is_int(ann_id):
            yield DatasetError(f"annotations[{pos}] has no integer 'id' (got {ann_id!r})", file=path, field="id",
                               fix="give every annotation a unique integer id")
            continue
        if ann_id in seen:
            yield DatasetError("duplicate annotation id", file=path, annotation_id=ann_id, field="id",
                               fix="make annotation ids unique")
        seen.add(ann_id)
        image_id = ann.get("image_id")
        if not _is_int(image_id) or image_id not in image_ids:
            yield DatasetError(f"refers to image id {image_id!r}, which is not in 'images'", file=path,
                               annotation_id=ann_id, field="image_id",
                               fix="add that image to 'images' or remove the annotation")
        cat_id = ann.get("category_id")
        if not _is_int(cat_id) or cat_id not in cat_ids:
            yield DatasetError(f"refers to category id {cat_id!r}, which is not in 'categories'", file=path,
                               annotation_id=ann_id, image_id=image_id if _is_int(image_id) else None,
                               field="category_id", fix="add the category or fix the annotation's category_id")
        problem = _bbox_problem(ann.get("bbox"))
        if problem:
            yield DatasetError(problem[1], file=path, annotation_id=ann_id,
                               image_id=image_id if _is_int(image_id) else None, field=problem[0],
                               fix="fix the box or remove the annotation")
        if ann.get("iscrowd", 0) not in (0, 1):  # True/False compare equal to 1/0
            yield DatasetError(f"must be 0 or 1, got {ann.get('iscrowd')!r}", file=path, annotation_id=ann_id,
                               field="iscrowd", fix="set iscrowd to 0 (an object) or 1 (a crowd region)")


def _raise_first(problems: Iterator[DatasetError]) -> None:
    problems = list(problems)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        details = problems[0].details()
        reason = details.pop("reason") + f" ({len(problems) - 1} more problem(s) like it in the file)"
        raise DatasetError(reason, **details)


def _check_image_files(images: list[dict], image_root: str, path: str) -> None:
    """All image files exist; if not, name the first few and the count (usually a wrong image_root). On object
    storage one listing of the root answers for every image (not one request per image)."""
    root = Location(image_root)
    if root.remote:
        try:
            present = root.all_files()
        except OSError as e:
            raise DatasetError(f"cannot list image_root ({e})", file=path, field="image_root",
                               fix="check the URI, AWS_ENDPOINT_URL and the credentials") from None
        missing = [im for im in images if posixpath.normpath(im["file_name"]) not in present]
    else:
        missing = [im for im in images if not os.path.isfile(os.path.join(image_root, im["file_name"]))]
    if not missing:
        return
    listed = ", ".join(f"{im['file_name']} (image id {im['id']})" for im in missing[:MAX_LISTED_MISSING])
    more = f" and {len(missing) - MAX_LISTED_MISSING} more" if len(missing) > MAX_LISTED_MISSING else ""
    raise DatasetError(f"{len(missing)} of {len(images)} image files not found under image_root '{image_root}': "
                       f"{listed}{more}", file=path, field="file_name",
                       fix="pass image_root= (it defaults to the annotation file's folder; file_name is resolved "
                       "against it), or load with check_images=False to skip this check")


# ---------------------------------------------------------------------------------------------- cleaning


def _clip_box(bbox: list, width: int, height: int) -> tuple[str, list[float]]:
    """Clip a COCO [x, y, w, h] box to the image: ("kept" | "clipped" | "outside" | "degenerate", xyxy)."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        return "outside", [x1, y1, x2, y2]
    if x2 - x1 < MIN_BOX_SIZE or y2 - y1 < MIN_BOX_SIZE:
        return "degenerate", [x1, y1, x2, y2]
    changed = (x1, y1, x2, y2) != (x, y, x + w, y + h)
    return ("clipped" if changed else "kept"), [x1, y1, x2, y2]


def _clean_annotation(ann: dict, xyxy: list[float], clipped: bool) -> dict:
    """The annotation as pycocotools will see it: clipped box, and the keys COCOeval needs filled in."""
    x1, y1, x2, y2 = xyxy
    out = dict(ann)
    out["bbox"] = [x1, y1, x2 - x1, y2 - y1]
    box_area = (x2 - x1) * (y2 - y1)
    area = ann.get("area")
    if not _is_number(area) or not math.isfinite(area) or area <= 0:
        out["area"] = box_area
    elif clipped:
        out["area"] = min(float(area), box_area)
    out["iscrowd"] = int(ann.get("iscrowd", 0))
    return out


def _clean(images: list[dict], annotations: list[dict], report: LoadReport) -> tuple[list[dict], dict]:
    """Clip/drop boxes, counting every repair; return the cleaned annotations and boxes per image id."""
    size = {im["id"]: (im["width"], im["height"]) for im in images}
    kept: list[dict] = []
    per_image: dict[int, list[tuple[list[float], int]]] = defaultdict(list)
    for ann in annotations:
        width, height = size[ann["image_id"]]
        status, xyxy = _clip_box(ann["bbox"], width, height)
        crowd = bool(ann.get("iscrowd", 0))
        if crowd:
            report.crowd += 1
        elif status == "outside":
            report.dropped_outside += 1
        elif status == "degenerate":
            report.dropped_degenerate += 1
        elif status == "clipped":
            report.clipped += 1
        if status in ("outside", "degenerate"):
            continue
        kept.append(_clean_annotation(ann, xyxy, status == "clipped"))
        if not crowd:
            per_image[ann["image_id"]].append((xyxy, ann["category_id"]))
    return kept, per_image


def _renumber_if_needed(annotations: list[dict], report: LoadReport) -> None:
    """pycocotools' matcher stores matched ids with 0 meaning 'none': an annotation id 0 would never match."""
    if any(a["id"] <= 0 for a in annotations):
        for new_id, ann in enumerate(annotations, start=1):
            ann["id"] = new_id
        report.renumbered_annotation_ids = True


def _make_records(images: list[dict], per_image: dict, label_of: dict[int, int], root: str) -> list[ImageRecord]:
    records, remote = [], Location(root).remote
    for im in images:
        objects = per_image.get(im["id"], [])
        boxes = np.array([b for b, _ in objects], dtype=np.float32).reshape(-1, 4)
        labels = np.array([label_of[c] for _, c in objects], dtype=np.int64)
        path = str(Location(root) / im["file_name"]) if remote else os.path.join(root, im["file_name"])
        records.append(ImageRecord(im["id"], path, im["width"], im["height"], boxes, labels))
    return records


def _make_coco(data: dict, images: list[dict], annotations: list[dict], categories: list[dict]) -> COCO:
    """A pycocotools COCO over the cleaned data, built in memory (no second parse) with its prints silenced."""
    coco = COCO()
    coco.dataset = {"info": data.get("info", {}), "licenses": data.get("licenses", []), "images": images,
                    "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------------------------- entry


def load_coco(ann_file: str, image_root: str | None = None, *, check_images: bool = True,
              images_only: bool = False) -> CocoDataset:
    """Validate and load a COCO instances file; raise one DatasetError for the first problem found.

    `file_name`s are resolved against `image_root`, which defaults to the annotation file's folder.
    Labels are contiguous 0..C-1 in order of ascending COCO category id; `cat_ids` maps them back.
    `images_only`: an image-info file without annotations (test-dev style) is accepted, for predicting only.
    """
    path = str(ann_file)
    if image_root is not None:
        root = str(image_root)
    elif Location(path).remote:
        root = str(Location(path).parent)
    else:
        root = os.path.dirname(os.path.abspath(path))
    data = _read_json(path)
    if images_only and "annotations" not in data:
        data = {**data, "annotations": []}
    _check_top_level(data, path)
    _raise_first(_category_problems(data["categories"], path))
    _raise_first(_image_problems(data["images"], path))
    _raise_first(_annotation_problems(data["annotations"], {im["id"] for im in data["images"]},
                                      {c["id"] for c in data["categories"]}, path))

    images = [{**im, "width": _positive_size(im["width"]), "height": _positive_size(im["height"])}
              for im in data["images"]]
    if check_images:
        _check_image_files(images, root, path)
    categories = sorted((dict(c) for c in data["categories"]), key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}

    report = LoadReport(file=path, images=len(images), annotations=len(data["annotations"]))
    annotations, per_image = _clean(images, data["annotations"], report)
    _renumber_if_needed(annotations, report)
    records = _make_records(images, per_image, label_of, root)
    report.boxes = sum(len(r.labels) for r in records)
    report.negatives = sum(1 for r in records if len(r.labels) == 0)

    return CocoDataset(coco=_make_coco(data, images, annotations, categories), records=records,
                       categories=categories, cat_ids=[c["id"] for c in categories], report=report)

