"""From head outputs to detections: score = sqrt(cls x IoU), per-class NMS, PAA's score voting, top-k."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from schemas.config import InferenceConfig
from trainer.box_coder import decode
from trainer.model import HeadOutputs

VOTING_SIGMA = 0.025


def score_voting(det_boxes: Tensor, det_labels: Tensor, cand_boxes: Tensor, cand_scores: Tensor,
                 cand_labels: Tensor) -> Tensor:
    """PAA's score voting: each kept box becomes the average of same-class candidates that overlap it, weighted by
    score x exp(-(1 - IoU)^2 / sigma). Scores stay those of the kept boxes. A box flattened to no area by the clamp
    to the image overlaps nothing (0/0 is 0, as MMDetection's IoU with its eps) and is kept as NMS left it."""
    ious = box_iou(det_boxes, cand_boxes).nan_to_num(0.0)
    same = det_labels[:, None] == cand_labels[None, :]
    w = torch.exp(-(1 - ious) ** 2 / VOTING_SIGMA) * cand_scores[None, :] * (same & (ious > 0.01))
    total = w.sum(1, keepdim=True)
    return torch.where(total > 0, (w @ cand_boxes) / total.clamp(min=1e-12), det_boxes)


def postprocess_image(cls_logits: Tensor, box_deltas: Tensor, iou_logits: Tensor, anchors: Tensor,
                      num_anchors_per_level: list[int], cfg: InferenceConfig,
                      image_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Detections of one image in input pixels: boxes [N,4], scores [N], labels [N]; clamped to `image_size`
    (H, W) when given."""
    scores = torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(iou_logits)[:, None])
    keep_boxes, keep_scores, keep_labels = [], [], []
    start = 0
    num_classes = scores.shape[1]
    for n in num_anchors_per_level:
        s = scores[start:start + n].flatten()
        cand = (s > cfg.score_thr).nonzero().squeeze(1)
        if cand.numel() > cfg.pre_nms_topk:
            cand = cand[s[cand].topk(cfg.pre_nms_topk).indices]
        anchor_idx = start + cand // num_classes
        keep_boxes.append(decode(anchors[anchor_idx], box_deltas[anchor_idx]))
        keep_scores.append(s[cand])
        keep_labels.append(cand % num_classes)
        start += n
    boxes, sc, labels = torch.cat(keep_boxes), torch.cat(keep_scores), torch.cat(keep_labels)
    if image_size is not None:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=image_size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=image_size[0])
    keep = batched_nms(boxes, sc, labels, cfg.nms_iou)[: cfg.max_det]
    det_boxes = boxes[keep]
    if cfg.score_voting:
        det_boxes = score_voting(det_boxes, labels[keep], boxes, sc, labels)
    return det_boxes, sc[keep], labels[keep]


@torch.no_grad()
def detect(model, images: Tensor, anchors_fn, cfg: InferenceConfig) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Run `model` in eval mode on a batch and post-process every image."""
    model.eval()
    out: HeadOutputs = model(images)
    anchors, nl = anchors_fn(out.level_sizes)
    size = tuple(images.shape[-2:])
    return [postprocess_image(out.cls_logits[i], out.box_deltas[i], out.iou_logits[i], anchors, nl, cfg, size)
            for i in range(images.shape[0])]
