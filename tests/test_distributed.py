"""Multi-process training and evaluation on CPU workers (gloo), as ``train_net.py --num-gpus 2``
runs them.

* One optimizer step of ``Trainer`` (SyncBN, DDP, AdamW + clipping) with the global batch split over
  2 workers gives the gradients and weights of one step in a single process on the whole batch.
* The loss normalization (number of masks, CE weights) does not depend on the split, even with fewer
  target masks than workers; the training sampler gives the workers disjoint shards of one
  permutation.
* ``train_net.py --eval-only --num-gpus 2`` evaluates every test image exactly once and gives the
  predictions and AP of a single process.
"""

import itertools
import math
import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, tiny_cfg

WORLD_SIZE = 2
TIMEOUT_S = 300  # generous: the 2 CPU cores are shared; a hang fails instead of blocking the suite


def _matcher_with_same_points(criterion) -> None:
    """Make ``criterion``'s matcher sample the same points at every call.

    The matcher draws its points from the worker's RNG stream, so which points an image gets depends
    on the images processed before it on that worker: splitting a batch changes the sampling noise
    of the costs (not their expectation). Fixing the points makes the 1- and 2-process matchings
    identical.
    """
    from iaunet.modeling.matcher import HungarianMatcher

    class SamePointsMatcher(HungarianMatcher):
        def cost_matrix(self, *args):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return super().cost_matrix(*args)

    m = criterion.matcher
    criterion.matcher = SamePointsMatcher(m.cost_class, m.cost_mask, m.cost_dice, m.num_points)


def _step(model, optimizer, batch):
    """One training step; returns the (averaged) gradients before clipping, by parameter name."""
    model.train()
    optimizer.zero_grad()
    sum(model(batch).values()).backward()
    grads = {
        n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()
    }
    optimizer.step()
    return grads


def _criterion_case(part=None):
    """A global batch of 2 images with a single target mask in all: outputs (leaf tensors) and
    targets.

    ``part=r`` returns image r only (what worker r sees). Returns (criterion, leaves, outputs,
    targets).
    """
    from iaunet.modeling.criterion import SetCriterion
    from iaunet.modeling.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, 4, 2, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    target_mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    target_mask[0, 4:20, 8:24] = True
    targets = [
        {"labels": torch.zeros(1, dtype=torch.int64), "masks": target_mask},
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
        },
    ]
    images = slice(None) if part is None else slice(part, part + 1)
    logits, masks = logits[images].clone().requires_grad_(), masks[images].clone().requires_grad_()
    criterion = SetCriterion(1, HungarianMatcher(num_points=64))
    _matcher_with_same_points(criterion)
    return criterion, (logits, masks), {"pred_logits": logits, "pred_masks": masks}, targets[images]


def _step_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        import detectron2.utils.comm as comm
        from detectron2.config import get_cfg
        from detectron2.data.samplers import TrainingSampler
        from torch.nn.parallel import DistributedDataParallel

        from iaunet import add_iaunet_config
        from iaunet.engine import Trainer, adapt_config_to_machine

        comm.create_local_process_group(WORLD_SIZE)
        cfg = get_cfg()
        add_iaunet_config(cfg)
        cfg.merge_from_file(os.path.join(tmp, "config.yaml"))
        # SyncBN -> naiveSyncBN on CPU workers, as setup() does
        adapt_config_to_machine(cfg, WORLD_SIZE)
        trainer = Trainer(cfg)
        assert isinstance(trainer.model, DistributedDataParallel)
        trainer.model.module.load_state_dict(torch.load(os.path.join(tmp, "init.pth")))
        _matcher_with_same_points(trainer.model.module.criterion)
        batch = torch.load(os.path.join(tmp, "batch.pth"), weights_only=False)
        per_worker = len(batch) // WORLD_SIZE
        grads = _step(
            trainer.model, trainer.optimizer, batch[rank * per_worker : (rank + 1) * per_worker]
        )

        criterion, leaves, outputs, targets = _criterion_case(part=rank)
        losses = criterion(outputs, targets)
        sum(losses.values()).backward()

        torch.save(
            {
                "grads": grads,
                "state": trainer.model.module.state_dict(),
                "sync_bn": sum(
                    "SyncBatchNorm" in type(m).__name__ for m in trainer.model.modules()
                ),
                "plain_bn": sum(type(m) is torch.nn.BatchNorm2d for m in trainer.model.modules()),
                "criterion_losses": {k: v.detach() for k, v in losses.items()},
                "criterion_grads": [x.grad for x in leaves],
                "sampler": list(itertools.islice(iter(TrainingSampler(32)), 16)),
            },
            os.path.join(tmp, f"rank{rank}.pth"),
        )
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> None:
    """Run fn(rank, *args) in WORLD_SIZE fresh processes; re-raise a worker's error; never leave one
    behind."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):  # raises (with the worker's traceback) if a worker failed
            assert time.monotonic() < deadline, f"workers did not finish in {TIMEOUT_S} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


def test_split_batch_step_matches_single_process(tmp_path):
    from detectron2.data import DatasetCatalog

    from iaunet.data import IAUNetDatasetMapper
    from iaunet.engine import Trainer

    tmp = str(tmp_path)
    cfg = tiny_cfg(
        **{
            "MODEL.IAUNET.DROPOUT": 0.0,
            "MODEL.IAUNET.BLOCKS_PER_LEVEL": 1,
            "SOLVER.IMS_PER_BATCH": 4,
            # the first step at the full learning rate: weight changes well above fp noise
            "SOLVER.WARMUP_ITERS": 0,
            "DATASETS.TRAIN": ("synthetic_cells_val",),
            "DATALOADER.NUM_WORKERS": 0,
            "OUTPUT_DIR": os.path.join(tmp, "out"),
        }
    )
    assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.IAUNET.NORM == "SyncBN"
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    mapper = IAUNetDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get("synthetic_cells_val")[:4]]
    # Equal image sizes: the padded batch size (and so the result) does not depend on the split.
    assert len({tuple(x["image"].shape) for x in batch}) == 1 and all(
        len(x["instances"]) for x in batch
    )
    torch.save(batch, os.path.join(tmp, "batch.pth"))

    model = Trainer.build_model(cfg)
    torch.save(model.state_dict(), os.path.join(tmp, "init.pth"))
    _matcher_with_same_points(model.criterion)
    optimizer = Trainer.build_optimizer(cfg, model)
    Trainer.build_lr_scheduler(cfg, optimizer)  # sets the initial learning rate, as in Trainer
    grads = _step(model, optimizer, batch)
    criterion, leaves, outputs, targets = _criterion_case()
    ref_losses = criterion(outputs, targets)
    sum(ref_losses.values()).backward()

    _spawn(_step_worker, tmp)
    ranks = [
        torch.load(os.path.join(tmp, f"rank{r}.pth"), weights_only=False) for r in range(WORLD_SIZE)
    ]

    # SyncBN: every BatchNorm of the model (backbone and pixel decoder) is synchronized.
    assert ranks[0]["sync_bn"] > 0 and ranks[0]["plain_bn"] == 0
    # Gradients after DDP's averaging equal the single-process gradients on the whole batch, up to
    # fp32 rounding (other summation orders, NaiveSyncBatchNorm's E[x^2] - E[x]^2). Tensors whose
    # gradient is rounding noise only (the biases of convolutions followed by BN) are left out of
    # the per-tensor check.
    assert grads.keys() == ranks[0]["grads"].keys()
    ref = torch.cat([g.flatten() for g in grads.values()])
    diff = torch.cat([ranks[0]["grads"][k].flatten() for k in grads]) - ref
    assert diff.norm() <= 2e-5 * ref.norm(), (diff.norm() / ref.norm()).item()
    for k, g in grads.items():
        rel = ((ranks[0]["grads"][k] - g).norm() / g.norm()).item()
        assert g.norm() <= 1e-4 * ref.norm() or rel <= 5e-5, (k, rel)
    # Updated weights (AdamW + full-model clipping): equal to 0.2% of a step where the gradient is
    # clearly non-zero. AdamW's first step is about +-lr by the gradient's sign, which noise-level
    # gradients do not fix.
    lr, g_max = cfg.SOLVER.BASE_LR, ref.abs().max()
    state = model.state_dict()
    init = torch.load(os.path.join(tmp, "init.pth"))
    assert (
        max((state[k] - init[k]).abs().max() for k in grads) > lr / 2
    )  # the step did move the weights
    for k, g in grads.items():
        change = (ranks[0]["state"][k] - state[k]).abs()
        assert torch.where(g.abs() > 1e-4 * g_max, change, 0).max() <= 2e-3 * lr, (
            k,
            change.max().item(),
        )
        assert change.max() <= 2 * lr + 1e-7, k
    # BN running means follow the global batch; both workers hold the same model.
    for k, v in state.items():
        if k.endswith("running_mean"):
            torch.testing.assert_close(ranks[0]["state"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    for k, v in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][k], v), k

    # Loss normalization with a single target mask for 2 workers: DDP's average of the worker
    # gradients and the mean of the logged worker losses are those of the whole batch.
    for r in range(WORLD_SIZE):
        for leaf, worker_grad in zip(leaves, ranks[r]["criterion_grads"]):
            torch.testing.assert_close(
                worker_grad / WORLD_SIZE, leaf.grad[r : r + 1], rtol=1e-5, atol=1e-7
            )
    for k, v in ref_losses.items():
        torch.testing.assert_close(
            sum(w["criterion_losses"][k] for w in ranks) / WORLD_SIZE, v.detach()
        )

    # Training sampler: disjoint shards of one shared permutation.
    shards = [w["sampler"] for w in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(32))


def _run_train_net(args, env, timeout=TIMEOUT_S) -> str:
    """Run train_net.py in its own process group (so that a hang kills its workers too); return its
    output."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_net.py")] + args,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"train_net.py timed out after {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    return out


def _copypaste_ap(log: str):
    lines = [ln.split("copypaste: ", 1)[1] for ln in log.splitlines() if "copypaste: " in ln]
    i = lines.index("AP,AP50,AP75,APs,APm,APl")
    return dict(zip(lines[i].split(","), (float(v) for v in lines[i + 1].split(","))))


def test_two_process_eval_only_covers_every_image_once(tmp_path, _datasets_root):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog

    from iaunet.engine import Trainer

    name = "synthetic_cells_val"
    cfg = tiny_cfg(
        **{
            "MODEL.IAUNET.BLOCKS_PER_LEVEL": 1,
            "DATASETS.TEST": (name,),
            "TEST.DETECTIONS_PER_IMAGE": 8,
            "DATALOADER.NUM_WORKERS": 0,
            "OUTPUT_DIR": str(tmp_path / "eval1"),
        }
    )
    config_file = str(tmp_path / "config.yaml")
    with open(config_file, "w") as f:
        f.write(cfg.dump())
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")

    env = dict(os.environ, DETECTRON2_DATASETS=_datasets_root, OMP_NUM_THREADS="1")
    log = _run_train_net(
        [
            "--config-file",
            config_file,
            "--eval-only",
            "--num-gpus",
            str(WORLD_SIZE),
            "--dist-url",
            "auto",
            "MODEL.WEIGHTS",
            str(tmp_path / "model.pth"),
            "OUTPUT_DIR",
            str(tmp_path / "eval2"),
        ],
        env,
    )
    assert log.count("copypaste: Task: segm") == 1  # only rank 0 logs to the console
    assert os.path.isfile(tmp_path / "eval2" / "log.txt") and os.path.isfile(
        tmp_path / "eval2" / "log.txt.rank1"
    )

    res1 = Trainer.test(cfg, model.eval())[
        "segm"
    ]  # the single-process evaluation of the same weights
    ap2 = _copypaste_ap(log)
    for k, v in ap2.items():
        assert (math.isnan(v) and math.isnan(res1[k])) or abs(v - res1[k]) < 1e-4, (k, v, res1[k])

    def predictions(run):
        return torch.load(
            tmp_path / run / "inference" / name / "instances_predictions.pth", weights_only=False
        )

    ids = sorted(d["image_id"] for d in DatasetCatalog.get(name))
    one, two = predictions("eval1"), predictions("eval2")
    assert sorted(p["image_id"] for p in two) == ids  # every image exactly once
    one = {p["image_id"]: p["instances"] for p in one}
    for p in two:
        ref = one[p["image_id"]]
        assert [i["segmentation"]["counts"] for i in p["instances"]] == [
            i["segmentation"]["counts"] for i in ref
        ]
        np.testing.assert_allclose(
            [i["score"] for i in p["instances"]], [i["score"] for i in ref], rtol=1e-4
        )
