"""`lad eval`: evaluate the network(s) of a checkpoint on a COCO file and write the stats as JSON."""
from __future__ import annotations

import json

from pipeline.coco import load_coco
from pipeline.validate import detections_list, predict_array, score
from schemas.config import RunConfig
from schemas.storage import Location
from trainer.categories import CategoryMismatch
from trainer.checkpoint import CheckpointError, checkpoint_network, load_checkpoint
from trainer.engine import pick_device
from trainer.network import AnchorCache


def evaluate_checkpoint(checkpoint: str, data: str, *, image_root: str | None = None, networks: str = "both",
                        out: str | None = None, device: str = "auto", progress: bool = True,
                        detections: str | None = None) -> dict[str, dict]:
    """Returns {network: stats}; `networks` is 'a', 'b' or 'both' (every network the checkpoint holds).
    `detections`: also write each network's detections there as a COCO results file (with this file's category
    ids; `name.b.json` for network B when both are evaluated). A file without annotations (test-dev style) gives
    detections only: {network: {}}."""
    ckpt = load_checkpoint(checkpoint)
    cfg = RunConfig.model_validate(ckpt["config"])
    held = sorted(ckpt["models"])
    names = held if networks == "both" else [networks]
    for n in names:
        if n not in held:
            raise CheckpointError(f"{checkpoint}: holds networks {held}; there is no network {n!r}")
    dataset = load_coco(data, image_root, images_only=detections is not None)
    if len(dataset.categories) != cfg.model.num_classes:
        raise CheckpointError(f"{checkpoint}: trained for {cfg.model.num_classes} classes but {data} has "
                              f"{len(dataset.categories)} categories")
    try:  # a file that numbers the checkpoint's categories otherwise is scored by name
        dataset = dataset.in_class_order(ckpt.get("categories"), f"{checkpoint} (evaluated on {data})")
    except CategoryMismatch as e:
        raise CheckpointError(str(e)) from None
    dev = pick_device(device)
    anchors_fn = AnchorCache(cfg, dev)

    scored = bool(dataset.coco.dataset.get("annotations"))
    results = {}
    for n in names:
        model = checkpoint_network(ckpt, checkpoint, n)
        found = predict_array(model.to(dev), anchors_fn, dataset, cfg.data.input_size, cfg.inference, dev,
                              progress=progress)
        if detections:
            target = Location(detections)
            if len(names) > 1 and n != "a":
                suffix = "." + target.name.rpartition(".")[2] if "." in target.name else ".json"
                target = target.with_suffix(f".{n}{suffix}")
            target.write_text(json.dumps(detections_list(found)))
        results[n] = score(dataset, found)[0] if scored else {}
    out_path = Location(out) if out else Location(checkpoint).with_suffix(".eval.json")
    out_path.write_text(json.dumps({"checkpoint": str(checkpoint), "data": str(data),
                                    "step": int(ckpt.get("step", 0)), "results": results}, indent=1))
    return results
