"""`lad assign CONFIG`: fill a LAD run's assignment store ahead of time, over the Ray cluster.

Every image of the training file, in every view the recipe makes (unflipped, and flipped when `data.flip_prob` is
above 0), goes through the same assigner pool as a training run (`pipeline.assigner.TeacherAssigner`), which
stores what it computes; with both flips in the recipe each image is asked once and its other flip is labelled in
the same forward. Views already stored are skipped, so an interrupted fill resumes where it stopped, and
any number of student runs with this teacher (other seeds, a sweep) then train without asking the teacher. At the
end the store's parts (one per assigned batch) are merged into one, which later runs read in one request.

A square `data.input_size` only: with keep-ratio inputs a view's anchors depend on the canvas of the batch it
lands in, which only the run's own plan decides.
"""
from __future__ import annotations

import sys

from schemas.config import ConfigError, RunConfig


def fill_store(cfg: RunConfig, *, progress: bool = True, verbose: bool = False) -> dict:
    """Assign every missing view; returns {"views", "stored_before", "computed", "store"}."""
    from pipeline import ray_env
    from pipeline.assignment_store import AssignmentStore, open_store
    from pipeline.coco import load_coco
    from pipeline.local import absolute_paths
    from trainer.network import check_start
    from trainer.worker import StreamSpec

    cfg = absolute_paths(cfg)
    if not cfg.pipeline.assignment_store:
        raise ConfigError("lad assign: set pipeline.assignment_store (a folder or an s3:// / gs:// URI) in the "
                          "config or with --set")
    if not isinstance(cfg.data.input_size, int):
        raise ConfigError(f"lad assign: data.input_size {list(cfg.data.input_size)} keeps the aspect ratio, so a "
                          "view's anchors depend on the canvas of the batch it lands in; fill the store by training "
                          "(the first epoch stores what it computes), or use a square input size")
    spec = StreamSpec.of(cfg)
    open_store(cfg, spec.anchor_hash, create=False)   # another teacher's store: refused before anything loads
    train = load_coco(cfg.data.train, cfg.data.image_root)
    check_start(cfg, train.categories)
    open_store(cfg, spec.anchor_hash)
    side = cfg.data.input_size
    store = AssignmentStore(cfg.pipeline.assignment_store)
    stored = store.index
    flips = (False, True) if cfg.data.flip_prob > 0 else (False,)
    records = train.records
    todo = [(i, flip) for flip in flips for i, r in enumerate(records) if (r.image_id, flip, side, side) not in stored]
    result = {"views": len(records) * len(flips), "stored_before": len(records) * len(flips) - len(todo),
              "computed": 0, "store": str(cfg.pipeline.assignment_store)}
    if 0 < cfg.data.flip_prob < 1:  # the assigner labels a missing view's other flip with it: ask once per image
        seen: set = set()
        todo = [(i, flip) for i, flip in todo if i not in seen and not seen.add(i)]
    if todo:
        before = len(store.index)
        started = ray_env.connect(cfg, verbose=verbose)
        try:
            _assign(cfg, records, todo, progress)
        finally:
            ray_env.shutdown(started)
        store.refresh()
        result["computed"] = len(store.index) - before
    result["parts_merged"] = store.compact()
    return result


def _assign(cfg: RunConfig, records, todo: list[tuple[int, bool]], progress: bool) -> None:
    import ray
    from tqdm import tqdm

    from pipeline import ray_env
    from pipeline.assigner import TeacherAssigner
    from pipeline.plan_source import records_table
    from schemas.assignment import BATCH_COLUMN, EPOCH_COLUMN

    p, size = cfg.pipeline, cfg.train.batch_size
    batches = [todo[k:k + size] for k in range(0, len(todo), size)]
    plan = [{EPOCH_COLUMN: 0, BATCH_COLUMN: b, "index": [i for i, _ in batch], "flip": [f for _, f in batch]}
            for b, batch in enumerate(batches)]
    budget = ray_env.budget(cfg, groups=(), stream=True)
    ray_env.configure_data_context(budget)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan))
    ds = ds.map_batches(
        TeacherAssigner, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=p.assigners, max_tasks_in_flight_per_actor=1),
        num_cpus=p.cpus_per_assigner, num_gpus=p.gpus_per_assigner or None,
        fn_constructor_kwargs=dict(cfg=cfg.to_dict(), records=ray.put(records_table(records)), store=True))
    with tqdm(total=len(todo), desc=f"lad assign {cfg.name}", unit="image", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            bar.update(table.num_rows)
