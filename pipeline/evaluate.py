"""COCO bbox evaluation that never crashes on the edge cases training hits (no detections at all early on).

pycocotools' `loadRes` fails on an empty list, so the results object is built here directly (the same
fields `loadRes` fills for boxes). A stat is -1 where COCO defines none: no ground truth in that area range
(e.g. APl on the digits dataset, whose objects are all under 96x96 px); everything defined is 0 when there
are no detections.
"""

from __future__ import annotations

import contextlib
import copy
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _results_coco(coco_gt: COCO, detections: list[dict]) -> COCO:
    """A COCO object of detections, as `loadRes` would build for boxes, but also for an empty list."""
    annotations = []
    for i, det in enumerate(detections, start=1):
        x, y, w, h = (float(v) for v in det["bbox"])
        image_id = int(det["image_id"])
        if image_id not in coco_gt.imgs:
            raise ValueError(f"detection {i - 1} is for image id {image_id}, which the ground truth does not have")
        annotations.append({"id": i,  # from 1: COCOeval treats id 0 as "unmatched"
                            "image_id": image_id, "category_id": int(det["category_id"]), "bbox": [x, y, w, h],
                            "area": w * h, "score": float(det["score"]), "iscrowd": 0})
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]),
                   "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])), "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_evaluate(coco_gt: COCO, detections: list[dict],
                  image_ids: list[int] | None = None) -> tuple[dict[str, float], str]:
    """COCO bbox stats by name, and the standard 12-line summary table as text.

    `detections`: dicts with image_id, category_id (COCO ids), bbox [x, y, w, h] in original image pixels,
    score. `image_ids` restricts the evaluation to those images (e.g. a subset evaluated mid-training);
    detections on other images are then ignored.
    """
    results = _results_coco(coco_gt, detections)
    evaluator = COCOeval(coco_gt, results, iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    return stats, table.getvalue().rstrip("\n")
