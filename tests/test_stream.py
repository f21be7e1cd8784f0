"""The assignment service's pieces without Ray: the batch plan, the read and assigner stages called in-process,
the stream decode, and the equality of the streamed assignment with the in-process LAD assignment."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.assigner import StreamSpec, TeacherAssigner, load_row_pixels, read_batch
from pipeline.coco import load_coco
from pipeline.dataset import DetectionDataset
from pipeline.loop import Start, epoch_order, plan_batches, total_steps
from pipeline.plan_source import PlanSource, plan_table, records_table
from tests.tiny import make_data, make_teacher, tiny_config
from schemas.assignment import PROB_STEP, SchemaMismatch, decode_batch
from trainer.engine import Engine
from trainer.losses import soft_label_kd
from trainer.soft_codec import MAX_STEP_ERROR
from trainer.worker import decode_stream_batch, labels_to_sparse, sparse_to_labels, split_batches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    data = make_data(root / "data")
    teacher = make_teacher(tiny_config(data, root / "runs", mode="paa"), root / "teacher.pt")
    return root, data, teacher


def decode(out, spec, **kw):
    return decode_stream_batch(out, spec, torch.device("cpu"),
                               load_pixels=lambda rows: load_row_pixels(rows, spec.input_size), **kw)


def streamed_and_local(cfg, epoch=1, size=4, order=None):
    """One training batch both ways: the in-process loader's, and through the TeacherAssigner stage."""
    torch.set_num_threads(1)
    coco = load_coco(cfg.data.train)
    ds = DetectionDataset(coco, cfg.data.input_size, train=True, seed=cfg.seed, flip_prob=cfg.data.flip_prob)
    ds.set_epoch(epoch)
    order = order or [int(i) for i in epoch_order(len(coco.records), cfg.seed, epoch)[:size]]
    local = ds.collate([ds[i] for i in order])
    spec = StreamSpec.of(cfg)
    out = TeacherAssigner(cfg.to_dict(), records_table(coco.records))(plan_table(epoch, [order]))
    streamed = decode(out, spec, hard=cfg.mode in ("lad", "solad"), soft=cfg.mode in ("kd", "solad"))
    return local, streamed, out


# ----------------------------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("n,batch,workers", [(24, 4, 1), (24, 5, 2), (23, 4, 3), (3, 4, 2), (10, 3, 4)])
def test_plan_batches_takes_every_image_once_and_splits_the_rest_evenly(n, batch, workers):
    order = list(np.random.default_rng(n).permutation(n))
    batches = plan_batches(order, batch, workers)
    assert [i for b in batches for i in b] == order           # every image once, in the epoch's order
    assert all(0 < len(b) <= batch for b in batches)
    full = n // (batch * workers) * workers
    assert all(len(b) == batch for b in batches[:full])
    rest = [len(b) for b in batches[full:]]
    assert len(rest) <= workers and (not rest or max(rest) - min(rest) <= 1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_batch_count_arithmetic_matches_the_plan(world):
    from pipeline.loop import batches_in

    for n in range(0, 40):
        batches = plan_batches(list(range(n)), 4, world)
        steps = [batches[k:k + world] for k in range(0, len(batches), world)]
        for cut in range(0, len(steps) + 2):
            assert batches_in(n, cut, 4, world) == sum(len(s) for s in steps[:cut]), (n, cut)


def test_plan_with_one_worker_is_the_in_process_batching():
    order = list(range(10))
    assert plan_batches(order, 4, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_plan_run_skips_trained_ids_and_stops_at_the_step_budget(tiny):
    root, data, teacher = tiny
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher, train={"epochs": 3, "batch_size": 5},
                      pipeline={"num_workers": 2})
    records = load_coco(cfg.data.train).records
    n = len(records)
    assert total_steps(cfg, n, workers=2) == 3 * -(-n // 10)
    trained = [records[int(i)].image_id for i in epoch_order(n, cfg.seed, 1)[:7]]
    source = PlanSource(cfg, [r.image_id for r in records], Start(epoch=1, trained_ids=trained), remaining_steps=4)
    assert source.budgets == [(1, 2, 4), (2, 2, 4)]            # planned by arithmetic, no order drawn yet
    assert source.offsets == {1: 0, 2: 4}
    rows = [row for task in source.get_read_tasks(1) for block in task() for row in block.to_pylist()]
    items = [{"epoch": r["epoch"], "image_id": [records[i].image_id for i in r["index"]]} for r in rows]
    assert [(r["epoch"], r["batch_index"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    first = [i for it in items if it["epoch"] == 1 for i in it["image_id"]]
    assert sorted(first + trained) == sorted(r.image_id for r in records)  # the rest of epoch 1, nothing twice
    assert not set(first) & set(trained)
    epochs = [it["epoch"] for it in items]
    assert epochs == sorted(epochs) and set(epochs) == {1, 2}
    # 17 left in epoch 1 -> 2 steps (10 + 4+3); 2 more steps of epoch 2 -> 4 batches of 5
    assert [len(it["image_id"]) for it in items if it["epoch"] == 2] == [5, 5, 5, 5]


# ----------------------------------------------------------------------------------------------- equivalence

def test_streamed_lad_assignment_equals_in_process(tiny):
    """Same batch, same teacher weights: the assignment that reaches the student through the stream is the one
    Engine.step computes in-process, bit for bit (labels, GT index, ignores), and so are the images and GT."""
    root, data, teacher = tiny
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher)
    local, streamed, _ = streamed_and_local(cfg)
    assert streamed.image_ids == [int(i) for i in local["image_ids"]]
    assert torch.equal(streamed.images, local["images"]) and streamed.images.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(streamed.gt_boxes, local["boxes"]))
    assert all(torch.equal(a, b) for a, b in zip(streamed.gt_labels, local["labels"]))
    engine = Engine(cfg, "cpu", 10)
    result = engine.step(local["images"], local["boxes"], local["labels"])   # the in-process LAD step
    ref = result.labels
    assert int(ref.pos.sum()) > 0
    for name in ("labels", "gt_index", "ignore"):
        assert torch.equal(getattr(streamed.labels, name), getattr(ref, name)), name
    assert streamed.teacher_version == 0 and streamed.assign_ms > 0


def test_streamed_lad_equals_in_process_on_keep_ratio_batches_of_mixed_aspect_ratios(tmp_path):
    """`data.input_size: [long, short]`: landscape and portrait images in one batch, resized keeping their ratio
    and padded to the batch's canvas (a multiple of 32); the stream sends the canvas with the batch, and the
    student's images, GT and labels are still exactly those of the in-process step."""
    data = make_data(tmp_path / "rect", shapes=[(96, 64), (64, 96)], num_train=8, num_val=2)
    teacher = make_teacher(tiny_config(data, tmp_path / "runs", mode="paa", input_size=[120, 80]),
                           tmp_path / "teacher.pt")
    cfg = tiny_config(data, tmp_path / "runs", mode="lad", teacher=teacher, input_size=[120, 80])
    for order in ([0, 1, 2, 3], [0, 2]):           # mixed: 128x128 canvas; landscapes only: 96x128
        local, streamed, out = streamed_and_local(cfg, order=order)
        assert tuple(local["images"].shape[-2:]) == ((128, 128) if 1 in order else (96, 128))
        assert torch.equal(streamed.images, local["images"])
        assert all(torch.equal(a, b) for a, b in zip(streamed.gt_boxes, local["boxes"]))
        ref = Engine(cfg, "cpu", 10).step(local["images"], local["boxes"], local["labels"]).labels
        assert int(ref.pos.sum()) > 0
        for name in ("labels", "gt_index", "ignore"):
            assert torch.equal(getattr(streamed.labels, name), getattr(ref, name)), name


def test_the_stream_carries_each_image_once_as_its_encoded_file(tiny):
    """No pixels in the stream: the `image_file` column holds each image's file as stored, `image` is null, and
    the batch's padded shape travels in its canvas columns."""
    root, data, teacher = tiny
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher)
    coco = load_coco(cfg.data.train)
    _, streamed, out = streamed_and_local(cfg, order=[0, 1, 2])
    files = [open(coco.records[i].path, "rb").read() for i in (0, 1, 2)]
    assert out.column("image_file").to_pylist() == files
    assert out.column("image").null_count == 3
    assert set(out.column("pad_height").to_pylist()) == set(out.column("pad_width").to_pylist()) == {64}
    assert streamed.image_bytes <= 1.01 * sum(len(f) for f in files) + 64


@pytest.mark.parametrize("mode,quality", [("kd", 85), ("solad", 85), ("kd", 100)])
def test_streamed_soft_labels_are_the_teachers(tiny, mode, quality):
    """The class probabilities the student receives are the teacher's as the picture gives them back (within the
    8-bit step when lossless, close on average otherwise), and the KD box targets are the teacher's up to fp16
    deltas and an 8-bit IoU probability; the student measures their weight itself."""
    root, data, teacher = tiny
    cfg = tiny_config(data, root / "runs", mode=mode, teacher=teacher, pipeline={"soft_label_quality": quality})
    local, streamed, out = streamed_and_local(cfg)
    engine = Engine(cfg, "cpu", 10)
    with torch.no_grad():
        tout = engine.teacher(local["images"])
        anchors, nl = engine.anchors(tout.level_sizes)
        ref = engine.soft_targets(tout, anchors, local["boxes"])
        student = engine.model(local["images"])
    s = streamed.soft
    assert torch.equal(s.batch_idx, ref.batch_idx) and torch.equal(s.anchor_idx, ref.anchor_idx)
    assert torch.equal(s.deltas, ref.deltas.half().float())
    assert ((s.iou_prob - ref.iou_prob).abs() <= PROB_STEP / 2 + 1e-6).all()
    assert ((s.weight - ref.weight).abs() < 5e-3).all()
    err = (s.cls_prob - ref.cls_prob).abs()
    assert float(err.max()) <= MAX_STEP_ERROR + 1e-6 if quality == 100 else float(err.mean()) < 2e-3
    d = cfg.distill
    kw = dict(cls_weight=d.cls_weight, iou_weight=d.iou_weight, box_weight=d.box_weight, gamma=d.gamma)
    dense = soft_label_kd(student.cls_logits, student.box_deltas, student.iou_logits, ref, anchors, **kw)
    streamed_kd = soft_label_kd(student.cls_logits, student.box_deltas, student.iou_logits, s, anchors, **kw)
    assert torch.allclose(streamed_kd["kd_box"], dense["kd_box"], rtol=1e-3, atol=1e-6)   # fp16 deltas
    assert torch.allclose(streamed_kd["kd_iou"], dense["kd_iou"], rtol=1e-2, atol=1e-6)   # 8-bit probabilities
    # An untrained teacher and student both sit at the 0.01 prior, where kd_cls (~1e-3) is all rounding:
    # tests/test_soft_codec.py and docs/results.md measure kd_cls against dense where the loss means something.
    if mode == "solad":
        ref_labels = Engine(cfg, "cpu", 10).step(local["images"], local["boxes"], local["labels"]).labels
        assert torch.equal(streamed.labels.gt_index, ref_labels.gt_index)
    assert out.column("soft_image").type == pa.binary()
    images = decode_batch(out, StreamSpec.of(cfg).anchor_hash)
    assert all(bytes(r.soft_image)[4:12] == b"ftypavif" for r in images)   # an AVIF picture per image


def test_sparse_labels_round_trip():
    g = torch.Generator().manual_seed(0)
    gt_index = torch.randint(-1, 3, (3, 50), generator=g)
    gt_labels = [torch.tensor([4, 7, 1]), torch.tensor([0, 0, 9]), torch.tensor([2, 3, 5])]
    ignore = torch.rand(3, 50, generator=g) < 0.1
    labels = torch.full((3, 50), 10)
    for i in range(3):
        pos = gt_index[i] >= 0
        labels[i, pos] = gt_labels[i][gt_index[i, pos]]
    from trainer.losses import BatchLabels
    sparse = labels_to_sparse(BatchLabels(labels, gt_index, ignore))
    back = sparse_to_labels(*zip(*sparse), gt_labels, 50, 10)
    assert torch.equal(back.labels, labels) and torch.equal(back.gt_index, gt_index)
    assert torch.equal(back.ignore, ignore)


# ----------------------------------------------------------------------------------------------- the stream

def test_a_block_of_several_batches_is_split_back_into_them(tiny):
    root, data, teacher = tiny
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher)
    coco = load_coco(cfg.data.train)
    spec = StreamSpec.of(cfg)
    items, records = plan_table(0, [[0, 1, 2], [3, 4], [5]]), records_table(coco.records)
    table = read_batch(items, records=records, spec=spec, seed=0, flip_prob=0.5)
    parts = split_batches(table)
    assert [p.num_rows for p in parts] == [3, 2, 1]
    assigned = TeacherAssigner(cfg.to_dict(), records)(items)
    assert [p.column("image_id").to_pylist() for p in split_batches(assigned)] == \
        [[coco.records[i].image_id for i in b] for b in ([0, 1, 2], [3, 4], [5])]


def test_decode_refuses_a_stream_for_other_anchors(tiny):
    root, data, teacher = tiny
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher)
    _, _, out = streamed_and_local(cfg, size=2)
    other = StreamSpec.of(tiny_config(data, root / "runs", mode="lad", teacher=teacher, input_size=96))
    with pytest.raises(SchemaMismatch, match="anchor hash"):
        decode(out, other, hard=True, soft=False)


def test_resource_budget_error_names_the_knobs(monkeypatch, tiny):
    import ray

    from pipeline import ray_env

    root, data, teacher = tiny
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher,
                      pipeline={"num_workers": 2, "assigners": 3, "cpus_per_worker": 1, "cpus_per_assigner": 1})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ray_env.PipelineResourceError, match="cpus_per_worker"):
        ray_env.budget(cfg)
    ok = tiny_config(data, root / "runs", mode="lad", teacher=teacher, pipeline={"num_workers": 1, "assigners": 2})
    b = ray_env.budget(ok)
    assert b.data_cpus == pytest.approx(1.5) and b.train_cpus == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- idle workers

def _ddp_worker(rank, world, store_path, active, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.worker import ActiveMean

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ddp = DDP(model)
    hook = ActiveMean()
    hook.register(ddp)
    hook.set(active[rank], sum(active))
    x = torch.full((4, 3), float(rank + 1))
    ddp(x).pow(2).sum().backward()
    torch.save(model.weight.grad, f"{out_dir}/grad{rank}.pt")
    dist.destroy_process_group()


def test_an_idle_workers_gradient_is_left_out_of_the_mean(tmp_path):
    """3 DDP workers, worker 1 idle: every worker ends with the mean of the 2 active workers' gradients (DDP's
    default would divide their sum by 3 and add the idle worker's gradient)."""
    import torch.multiprocessing as mp

    active = [True, False, True]
    mp.spawn(_ddp_worker, args=(3, str(tmp_path / "store"), active, str(tmp_path)), nprocs=3, join=True)
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in range(3)]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    expected = []
    for rank in (0, 2):
        model.zero_grad()
        model(torch.full((4, 3), float(rank + 1))).pow(2).sum().backward()
        expected.append(model.weight.grad.clone())
    mean = (expected[0] + expected[1]) / 2
    for g in grads:
        assert torch.allclose(g, mean, rtol=1e-5, atol=1e-6)
