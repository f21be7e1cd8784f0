"""PAA label assignment (the CONTRACT in ARCHITECTURE.md), in the order of the paper's section:

    1. candidates       `preassign` / `preassign_batch`: IoU pre-assignment of anchors to GT boxes
    2. anchor scores    `candidate_losses` / `candidate_losses_batch`: focal + 1.3 (1 - GIoU) of the scoring
                        network (the student in PAA, a frozen teacher in LAD)
    3. GMM selection    `paa_select` / `paa_select_batch`: per GT, a two-component GMM on its top-k losses
    4. labels           `select_labels` -> `BatchLabels`, what a student trains on
    5. the whole        `paa_assign_batch` (production: the in-process step, the assigner service, the teacher),
                        and `paa_assign`, one image of it
    6. CoLAD            `colad_merge` / `colad_merge_with_pairs`: the std/mean criterion that picks, per GT and
                        level, which network's losses feed step 3 (the role policy around it: `trainer.colad`)

Everything works on torch tensors on any device, with no Python loop over GT boxes except in the scikit-learn
reference path (`gmm="sklearn"`), which follows the official PAA code GT by GT. The single-image contract
functions run the batch code on a batch of one.

Ties are broken the same way everywhere, so results are deterministic: among equal losses the anchor of lower
index comes first (per-level top-k and the per-GT sort), and among equal scores the lower loss wins.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, sigmoid_focal_loss

from trainer.box_coder import decode
from trainer.gmm import fit_predict_1d
from trainer.losses import BatchLabels, giou_loss, on_device

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
GIOU_WEIGHT = 1.3


@dataclass
class Assignment:
    """PAA's assignment of one image; `pos_losses` and `cand_gt` are kept for callers that reuse them."""

    labels: Tensor  # [A] long: GT class for positives, num_classes for background
    label_weights: Tensor  # [A] float: 0 where ignored, else 1
    gt_index: Tensor  # [A] long: index of the positive's GT box, -1 elsewhere
    pos_mask: Tensor  # [A] bool
    ignore_mask: Tensor  # [A] bool
    pos_losses: Tensor  # [A] float: candidate loss, 0 where cand_gt < 0
    cand_gt: Tensor  # [A] long: candidate GT of each anchor, -1 if none


def preassign(anchors: Tensor, gt_boxes: Tensor, iou_thr: float = 0.1) -> Tensor:
    """For each anchor the GT it is a candidate of, else -1 (MaxIoUAssigner, gt_max_assign_all, min_pos_iou 0).

    An anchor whose best IoU is >= `iou_thr` goes to that GT (first GT on equal IoU). Then each GT claims every
    anchor whose IoU with it equals the GT's own best IoU, later GTs overriding earlier ones, so that small GTs
    keep candidates. One deliberate difference from MMDetection: a GT whose best IoU is 0 (an empty box)
    claims nothing, where MMDetection's `min_pos_iou=0` would hand it every anchor it does not touch.
    """
    num_anchors = anchors.shape[0]
    cand_gt = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    num_gt = gt_boxes.shape[0]
    if num_gt == 0 or num_anchors == 0:
        return cand_gt
    iou = box_iou(gt_boxes.to(anchors.dtype), anchors)  # [G, A]
    best_iou, best_gt = iou.max(dim=0)
    cand_gt = torch.where(best_iou >= iou_thr, best_gt, cand_gt)
    gt_best = iou.max(dim=1, keepdim=True).values
    claims = (iou == gt_best) & (gt_best > 0)
    gt_ids = torch.arange(1, num_gt + 1, device=anchors.device)[:, None]
    last_claimant = (claims * gt_ids).amax(dim=0) - 1  # -1 where no GT claims the anchor
    return torch.where(last_claimant >= 0, last_claimant, cand_gt)


def preassign_batch(anchors: Tensor, gt_boxes: list[Tensor], iou_thr: float = 0.1) -> list[Tensor]:
    """`preassign` per image: it depends on anchors and GT only, so every scoring network of a batch shares it."""
    return [preassign(anchors, g, iou_thr) for g in gt_boxes]


@torch.no_grad()
def candidate_losses(anchors: Tensor, cls_logits: Tensor, box_deltas: Tensor, gt_boxes: Tensor,
                     gt_labels: Tensor, cand_gt: Tensor, idx: Tensor | None = None) -> Tensor:
    """PAA's candidate loss `[A]`: focal loss vs the GT's one-hot class + 1.3 (1 - GIoU) of the decoded box.

    Computed on candidate anchors only (0 elsewhere; `idx` lists them where already known) and without gradient:
    it ranks anchors, it is not trained.
    """
    if idx is None:
        idx = torch.nonzero(cand_gt >= 0).squeeze(1)
    losses = torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
    if idx.numel() == 0:
        return losses
    gt = cand_gt[idx]
    logits = cls_logits[idx].float()
    targets = F.one_hot(gt_labels[gt].long(), logits.shape[1]).to(logits.dtype)
    cls_loss = sigmoid_focal_loss(logits, targets, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="none").sum(1)
    boxes = decode(anchors[idx].float(), box_deltas[idx].float())
    box_loss = giou_loss(boxes, gt_boxes[gt].float())
    losses[idx] = cls_loss + GIOU_WEIGHT * box_loss
    return losses


def candidate_losses_batch(anchors: Tensor, cls_logits: Tensor, box_deltas: Tensor, gt_boxes: list[Tensor],
                           gt_labels: list[Tensor], cand_gt: list[Tensor]) -> list[Tensor]:
    """`candidate_losses` of every image of a batch's outputs (cls_logits [B, A, C], box_deltas [B, A, 4]). The
    candidates of the whole batch are found at once and counted per image in one transfer (two host reads per
    batch, not one per image); each image is then scored on its own rows, exactly as alone: vectorised kernels
    round a vector's tail differently from its body, so scoring a batch's candidates in one pass would make an
    image's losses (and so its labels) depend on its batch companions."""
    image, anchor = torch.nonzero(torch.stack(cand_gt) >= 0, as_tuple=True)
    counts = torch.bincount(image, minlength=len(cand_gt)).tolist()
    return [candidate_losses(anchors, cls_logits[i], box_deltas[i], gt_boxes[i], gt_labels[i], cand_gt[i], idx)
            for i, idx in enumerate(anchor.split(counts))]


def _rank_in_runs(sorted_keys: Tensor) -> Tensor:
    """Position of each element within its run of equal keys (keys sorted)."""
    position = torch.arange(sorted_keys.numel(), device=sorted_keys.device)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return position - torch.cummax(torch.where(starts, position, 0), dim=0).values


def _order_key(values: Tensor) -> Tensor:
    """int64 keys in the order of the float32 values (IEEE bits made monotonic), to sort groups and losses at once."""
    bits = values.float().view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits) + 2**31  # in [0, 2**32)


def _candidate_table(pos_losses_list: list[Tensor], cand_gt_list: list[Tensor], num_anchors_per_level: list[int],
                     topk: int):
    """Per GT of the batch, its candidates kept for the GMM, in ascending loss: a padded `[G, K]` table.

    Returns (losses [G, K] float32, valid [G, K] bool, anchor [G, K] flat index image*A + anchor, -1 where
    padded). GTs are numbered image after image. Images are read one by one (their candidates are a tenth of
    their anchors), which spares building `[B, A]` copies of the inputs.
    """
    num_images, num_anchors = len(cand_gt_list), cand_gt_list[0].numel()
    num_levels = len(num_anchors_per_level)
    device = cand_gt_list[0].device
    level_of_anchor = torch.repeat_interleave(torch.arange(num_levels, device=device),
                                              on_device(num_anchors_per_level, device), output_size=num_anchors)
    cand = torch.stack(cand_gt_list)
    image, anchor = torch.nonzero(cand >= 0, as_tuple=True)   # every image's candidates: one synchronisation
    local_gt = cand[image, anchor]
    loss = torch.stack(pos_losses_list)[image, anchor].float()
    gts_per_image = torch.zeros(num_images, dtype=torch.long, device=device).scatter_reduce_(
        0, image, local_gt + 1, reduce="amax")
    first_gt = torch.cumsum(gts_per_image, 0) - gts_per_image  # GTs are numbered image after image
    gt = first_gt.index_select(0, image) + local_gt
    flat = image * num_anchors + anchor
    num_gt = int(gts_per_image.sum())
    width = topk * num_levels
    table_loss = torch.zeros(num_gt, width, dtype=torch.float32, device=device)
    table_anchor = torch.full((num_gt, width), -1, dtype=torch.long, device=device)
    if flat.numel() == 0:
        return table_loss, table_anchor >= 0, table_anchor
    loss_key = _order_key(loss)
    # Top-k lowest losses per (GT, level): one stable sort on (GT, level, loss); ties keep anchor order.
    group = gt * num_levels + level_of_anchor.index_select(0, anchor)
    key = (group << 32) | loss_key
    # The sort costs ~40 ns a candidate, so first drop candidates that cannot be in their group's top-k: split
    # each group into k classes (by position), the largest of the k class minima is >= the group's k-th smallest
    # key (an empty class gives no bound); this keeps about a third of the candidates.
    cls = group * topk + torch.arange(key.numel(), device=device) % topk
    class_min = torch.full((num_gt * num_levels * topk,), torch.iinfo(torch.long).max, device=device)
    class_min.scatter_reduce_(0, cls, key, reduce="amin")
    bound = class_min.view(-1, topk).amax(dim=1)
    keep = torch.nonzero(key <= bound.index_select(0, group)).squeeze(1)
    order = keep.index_select(0, torch.argsort(key.index_select(0, keep), stable=True))
    order = order[_rank_in_runs(group.index_select(0, order)) < topk]
    # Per GT, the kept candidates in ascending loss (ties: lower anchor index first).
    row = gt.index_select(0, order)
    order = order.index_select(0, torch.argsort((row << 32) | loss_key.index_select(0, order), stable=True))
    row = gt.index_select(0, order)
    slot = _rank_in_runs(row)
    table_loss[row, slot] = loss.index_select(0, order)
    table_anchor[row, slot] = flat.index_select(0, order)
    return table_loss, table_anchor >= 0, table_anchor


def _separate(component: Tensor, score: Tensor, valid: Tensor, keep_single: bool = True) -> Tensor:
    """PAA's scheme (c): positives are the low-loss component's members up to its highest-scoring one.

    Rows are in ascending loss. Rows with a single candidate keep it (`keep_single`) or get none, as the official
    heads' "gmm needs at least two samples"; rows without a low-loss member get none.
    """
    count = valid.sum(dim=1, keepdim=True)
    foreground = valid & (component == 0)
    best = torch.where(foreground, score, -torch.inf).argmax(dim=1, keepdim=True)  # first max: lower loss
    column = torch.arange(valid.shape[1], device=valid.device)
    positive = foreground & (column <= best)
    return torch.where(count >= 2, positive, valid & (count == 1) & keep_single)


def _sklearn_fit(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official code's GMM on one GT's sorted float32 losses: (predict, score_samples).

    Where scikit-learn raises "ill-defined empirical covariance" (a component collapsed on one loss), this GT
    falls back to the torch EM, which is the same arithmetic with that variance floored at reg_covar: the
    reference answers everywhere, never takes the run down, and agrees with `gmm="torch"` by construction there.
    """
    from sklearn.mixture import GaussianMixture

    x = losses.astype(np.float32).reshape(-1, 1)
    gmm = GaussianMixture(2, weights_init=np.array([0.5, 0.5]), means_init=np.array([x.min(), x.max()]).reshape(2, 1),
                          precisions_init=np.ones((2, 1)), covariance_type="diag")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter, as in training
            gmm.fit(x)
        return gmm.predict(x), gmm.score_samples(x)
    except ValueError:
        row = torch.from_numpy(x.reshape(1, -1))
        component, score = fit_predict_1d(row, torch.ones_like(row, dtype=torch.bool))
        return component[0].numpy(), score[0].numpy()


def _select_reference(pos_losses: Tensor, cand_gt: Tensor, num_anchors_per_level: list[int], topk: int,
                      keep_single: bool = True) -> Tensor:
    """The official `paa_reassign` + `gmm_separation_scheme`, GT by GT with scikit-learn (deterministic ties)."""
    pos_mask = torch.zeros_like(cand_gt, dtype=torch.bool)
    cand = cand_gt.cpu().numpy()
    pos_inds = np.nonzero(cand >= 0)[0]  # as the official code, work on the candidates only
    pos_gt = cand[pos_inds]
    pos_level = np.searchsorted(np.cumsum(num_anchors_per_level), pos_inds, side="right")
    losses = pos_losses.detach().float().cpu().numpy()[pos_inds]
    chosen = []
    for gt in range(int(cand.max(initial=-1)) + 1):
        gt_mask = pos_gt == gt
        per_level = []
        for level in range(len(num_anchors_per_level)):
            idx = np.nonzero(gt_mask & (pos_level == level))[0]
            per_level.append(idx[np.argsort(losses[idx], kind="stable")[:topk]])
        idx = np.concatenate(per_level)
        idx = idx[np.argsort(losses[idx], kind="stable")]
        if idx.size < 2:
            if keep_single:
                chosen.append(pos_inds[idx])  # a single candidate stays positive
            continue
        component, score = _sklearn_fit(losses[idx])
        foreground = pos_inds[idx[component == 0]]
        if foreground.size:
            chosen.append(foreground[: int(np.argmax(score[component == 0])) + 1])
    if chosen:
        pos_mask[torch.from_numpy(np.concatenate(chosen)).to(pos_mask.device)] = True
    return pos_mask


def paa_select_batch(pos_losses_list: list[Tensor], cand_gt_list: list[Tensor], num_anchors_per_level: list[int],
                     topk: int = 9, gmm: str = "torch", keep_single: bool = True) -> list[tuple[Tensor, Tensor]]:
    """PAA's selection for every image of a batch (all sharing the same anchors), with one batched EM over all
    their GTs. Returns [(pos_mask [A], ignore_mask [A])] per image. `keep_single=False` drops GTs with a single
    candidate (`assign.single_candidate: drop`)."""
    if gmm == "sklearn":
        return [(_select_reference(losses, cand, num_anchors_per_level, topk, keep_single),
                 torch.zeros_like(cand, dtype=torch.bool))
                for losses, cand in zip(pos_losses_list, cand_gt_list)]
    if gmm != "torch":
        raise ValueError(f"gmm must be 'torch' or 'sklearn', got {gmm!r}")
    if not cand_gt_list:
        return []
    with torch.inference_mode():  # no autograd bookkeeping in the many small operations
        table_loss, valid, table_anchor = _candidate_table(pos_losses_list, [c.long() for c in cand_gt_list],
                                                           num_anchors_per_level, topk)
        component, score = fit_predict_1d(table_loss, valid)
        positive_anchor = table_anchor[_separate(component, score, valid, keep_single)]
    num_images, num_anchors = len(cand_gt_list), cand_gt_list[0].numel()
    pos_flat = torch.zeros(num_images * num_anchors, dtype=torch.bool, device=cand_gt_list[0].device)
    pos_flat[positive_anchor] = True
    ignore = torch.zeros_like(pos_flat)  # PAA's scheme ignores nothing
    return list(zip(pos_flat.view(num_images, num_anchors).unbind(0), ignore.view(num_images, num_anchors).unbind(0)))


def paa_select(pos_losses: Tensor, cand_gt: Tensor, num_anchors_per_level: list[int], topk: int = 9,
               gmm: str = "torch", keep_single: bool = True) -> tuple[Tensor, Tensor]:
    """PAA's selection for one image: (pos_mask [A], ignore_mask [A]); see the CONTRACT."""
    return paa_select_batch([pos_losses], [cand_gt], num_anchors_per_level, topk=topk, gmm=gmm,
                            keep_single=keep_single)[0]


def select_labels(pos_losses: list[Tensor], cand_gt: list[Tensor], num_anchors_per_level: list[int],
                  gt_labels: list[Tensor], num_classes: int, topk: int = 9, gmm: str = "torch",
                  keep_single: bool = True) -> BatchLabels:
    """PAA's selection over the batch in one call (`paa_select_batch`), as the labels a student trains on: the
    class of each positive's GT (`num_classes` elsewhere), its GT index (-1 elsewhere) and the ignored anchors."""
    masks = paa_select_batch(pos_losses, cand_gt, num_anchors_per_level, topk=topk, gmm=gmm, keep_single=keep_single)
    pos, ignore = (torch.stack(m) for m in zip(*masks))
    cand = torch.stack(cand_gt).long()
    labels = torch.full_like(cand, num_classes)
    if sum(len(g) for g in gt_labels):   # the class of each positive's GT, for the whole batch at once
        first_gt = on_device([0] + [len(g) for g in gt_labels[:-1]], cand.device).cumsum(0)  # sizes: no host read
        gt = first_gt[:, None] + cand.clamp(min=0)
        all_labels = torch.cat(gt_labels).long()
        labels = torch.where(pos, all_labels.index_select(0, gt.view(-1).clamp(max=len(all_labels) - 1)).view_as(gt),
                             labels)
    return BatchLabels(labels.to(cand_gt[0].dtype), torch.where(pos, cand, -1).to(cand_gt[0].dtype), ignore)


@dataclass
class BatchAssignment:
    """PAA's assignment of a batch: the labels, and per image the candidates and their losses it was made from."""

    labels: BatchLabels
    cand_gt: list[Tensor]     # per image [A] long: candidate GT of each anchor, -1 if none
    pos_losses: list[Tensor]  # per image [A] float: candidate loss, 0 where cand_gt < 0


def paa_assign_batch(anchors: Tensor, num_anchors_per_level: list[int], cls_logits: Tensor, box_deltas: Tensor,
                     gt_boxes: list[Tensor], gt_labels: list[Tensor], *, topk: int = 9, iou_thr: float = 0.1,
                     gmm: str = "torch", keep_single: bool = True) -> BatchAssignment:
    """The whole PAA assignment of a batch scored by one network (cls_logits [B, A, C], box_deltas [B, A, 4]):
    candidates, their losses, one batched GMM selection over every GT of the batch, labels."""
    cand_gt = preassign_batch(anchors, gt_boxes, iou_thr)
    pos_losses = candidate_losses_batch(anchors, cls_logits, box_deltas, gt_boxes, gt_labels, cand_gt)
    labels = select_labels(pos_losses, cand_gt, num_anchors_per_level, gt_labels, cls_logits.shape[-1], topk, gmm,
                           keep_single)
    return BatchAssignment(labels, cand_gt, pos_losses)


def paa_assign(anchors: Tensor, num_anchors_per_level: list[int], cls_logits: Tensor, box_deltas: Tensor,
               gt_boxes: Tensor, gt_labels: Tensor, *, topk: int = 9, iou_thr: float = 0.1,
               gmm: str = "torch", keep_single: bool = True) -> Assignment:
    """The whole PAA assignment of one image from the scoring network's outputs (cls_logits [A, C], deltas [A, 4]):
    `paa_assign_batch` on a batch of one."""
    batch = paa_assign_batch(anchors, num_anchors_per_level, cls_logits[None], box_deltas[None], [gt_boxes],
                             [gt_labels], topk=topk, iou_thr=iou_thr, gmm=gmm, keep_single=keep_single)
    labels = batch.labels
    ignore_mask = labels.ignore[0]
    return Assignment(labels=labels.labels[0], label_weights=(~ignore_mask).float(), gt_index=labels.gt_index[0],
                      pos_mask=labels.pos[0], ignore_mask=ignore_mask, pos_losses=batch.pos_losses[0],
                      cand_gt=batch.cand_gt[0])


def colad_merge(losses_a: Tensor, losses_b: Tensor, cand_gt: Tensor, num_anchors_per_level: list[int],
                num_gt: int | None = None) -> tuple[Tensor, Tensor]:
    """CoLAD's std/mean criterion (the CONTRACT): (merged_losses [A], b_was_teacher [G, L]).

    Per (GT, level), over all its candidates: with >= 2 candidates B's losses are used where
    std_B/mean_B >= std_A/mean_A (unbiased std; ties to B), with one candidate where mean_B < mean_A (ties to A).
    b_was_teacher is False on (GT, level) pairs without candidates: mask them with `colad_merge_with_pairs`'s
    third result to count a teacher ratio. G is `num_gt` if given, else cand_gt.max() + 1.
    """
    merged, b_was_teacher, _ = colad_merge_with_pairs(losses_a, losses_b, cand_gt, num_anchors_per_level, num_gt)
    return merged, b_was_teacher


def colad_merge_with_pairs(losses_a: Tensor, losses_b: Tensor, cand_gt: Tensor, num_anchors_per_level: list[int],
                           num_gt: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`colad_merge` plus `defined` [G, L]: the (GT, level) pairs with at least one candidate, where the criterion
    decided something (teacher ratio = b_was_teacher.sum() / defined.sum()); GTs without candidates (possible
    when `num_gt` is given) get all-undefined rows."""
    num_levels = len(num_anchors_per_level)
    device = cand_gt.device
    if num_gt is None:
        num_gt = int(cand_gt.max()) + 1 if cand_gt.numel() else 0
    idx = torch.nonzero(cand_gt >= 0).squeeze(1)
    level = torch.searchsorted(torch.tensor(np.cumsum(num_anchors_per_level), device=device), idx, right=True)
    group = cand_gt[idx] * num_levels + level
    count = torch.zeros(num_gt * num_levels, device=device).index_add_(0, group, torch.ones(group.shape, device=device))

    def spread(losses: Tensor) -> tuple[Tensor, Tensor]:
        values = losses[idx].float()
        mean = torch.zeros_like(count).index_add_(0, group, values) / count.clamp_min(1)
        sq_dev = (values - mean[group]) ** 2
        std = (torch.zeros_like(count).index_add_(0, group, sq_dev) / (count - 1).clamp_min(1)).sqrt()
        return mean, std / mean

    (mean_a, cv_a), (mean_b, cv_b) = spread(losses_a), spread(losses_b)
    use_b = torch.where(count >= 2, cv_b >= cv_a, mean_b < mean_a) & (count > 0)
    merged = losses_a.clone()
    merged[idx] = torch.where(use_b[group], losses_b[idx], losses_a[idx])
    return merged, use_b.view(num_gt, num_levels), (count > 0).view(num_gt, num_levels)
