"""COCO evaluation of a network on a validation file: batch inference, boxes mapped back, pycocotools COCOeval.

With several data-parallel workers each predicts its shard of the images (`predict(..., shard=(rank, world))`),
the detections travel as one float64 array per shard (`detections_array`) and the first worker scores them all
(`score`): the same detections, and so the same stats, as one process predicting every image.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.coco import CocoDataset
from pipeline.dataset import DetectionDataset
from pipeline.evaluate import STAT_NAMES, coco_evaluate
from pipeline.transforms import boxes_to_original
from schemas.config import InferenceConfig
from trainer.inference import detect


def predict(model, anchors_fn, dataset: CocoDataset, input_size, cfg: InferenceConfig,
            device: torch.device, batch_size: int = 16, progress: bool = False,
            shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """COCO-format detections (original image pixels, xywh, COCO category ids) for every image of `dataset`, or
    for shard `(rank, world)` of them (every world-th image from the rank-th). Leaves `model` in eval mode."""
    rank, world = shard
    if world > 1:
        dataset = dataclasses.replace(dataset, records=dataset.records[rank::world])
    samples = DetectionDataset(dataset, input_size, train=False)
    loader = DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=samples.collate)
    sizes = {r.image_id: (r.width, r.height) for r in dataset.records}
    dets = []
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        results = detect(model, batch["images"].to(device), anchors_fn, cfg)
        for (boxes, scores, labels), image_id, scale in zip(results, batch["image_ids"].tolist(), batch["scales"]):
            w, h = sizes[image_id]
            boxes = boxes_to_original(boxes.cpu(), float(scale), flip=False, resized_w=0)  # eval never flips
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                dets.append({"image_id": image_id, "category_id": dataset.cat_ids[label],
                             "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    return dets


def predict_array(model, anchors_fn, dataset: CocoDataset, input_size, cfg: InferenceConfig, device: torch.device,
                  shard: tuple[int, int] = (0, 1), progress: bool = False) -> np.ndarray:
    """`predict` on a shard as `detections_array`, with the model's train/eval mode as it was."""
    was_training = model.training
    dets = predict(model, anchors_fn, dataset, input_size, cfg, device, progress=progress, shard=shard)
    model.train(was_training)
    return detections_array(dets)


_FIELDS = 7  # image_id, category_id, x, y, w, h, score


def detections_array(dets: list[dict]) -> np.ndarray:
    """COCO detections -> float64 [N, 7] (exact for ids below 2^53): compact to gather across workers."""
    return np.array([(d["image_id"], d["category_id"], *d["bbox"], d["score"]) for d in dets],
                    np.float64).reshape(-1, _FIELDS)


def detections_list(arr: np.ndarray) -> list[dict]:
    return [{"image_id": int(row[0]), "category_id": int(row[1]), "bbox": row[2:6].tolist(), "score": float(row[6])}
            for row in np.asarray(arr, np.float64).reshape(-1, _FIELDS)]


def score(dataset: CocoDataset, detections: np.ndarray) -> tuple[dict[str, float], str]:
    """COCO stats of detections (`detections_array`, from every shard) over all of `dataset`'s images."""
    return coco_evaluate(dataset.coco, detections_list(detections), image_ids=[r.image_id for r in dataset.records])


_TABLE_ROWS = [("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
               ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100), ("AP", "0.50:0.95", "large", 100),
               ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
               ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100), ("AR", "0.50:0.95", "large", 100)]
_TITLES = {"AP": "Average Precision", "AR": "Average Recall"}


def format_table(stats: dict[str, float]) -> str:
    """The 12-line table pycocotools prints, rebuilt from the stats (e.g. those stored in eval.json)."""
    return "\n".join(f" {_TITLES[short]:<18} ({short}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = "
                     f"{stats[name]:0.3f}" for (short, iou, area, dets), name in zip(_TABLE_ROWS, STAT_NAMES))
