"""What a run is built from, built once before the first step: device and seeds, data, model and anchors,
the run identity, the resume decision (yolo.engine.resume), the leases, loss and loader.

`prepare_run(cfg, ctx)` returns a `RunSetup`: a typed record, read by the loop, the checkpoints and the
report; nothing in it changes while the run trains (the loop's state is `yolo.engine.state.TrainState`).
The arguments are validated before anything is built (`yolo.engine.config.validate_config`), and the
image size is checked against the model's own stride before the anchors or the loss are touched.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from yolo.anchors import check_anchors_inline, read_anchors_json
from yolo.data.dataset import SplitIndex, load_data_config
from yolo.data.index import dataset_fingerprint_of, load_splits
from yolo.data.loader import TrainDataset, TrainLoader, create_train_loader
from yolo.device import cpu_threads, select_device
from yolo.engine import distributed as dist_utils
from yolo.engine import resume, run_folders
from yolo.engine.config import RUN_ID_PLACEHOLDER, TrainConfig, validate_config
from yolo.engine.distributed import DistContext
from yolo.engine.lease import Lease
from yolo.engine.nonfinite import refuse_nonfinite
from yolo.engine.run_identity import file_digest, run_identity
from yolo.errors import UserError
from yolo.files import prepare_out_dir, write_text
from yolo.hyp import Hyp, load_hyp
from yolo.imgsz import MAX_STRIDE, require_stride_multiple
from yolo.loss import YoloLoss, scale_loss_gains
from yolo.model.cfg import load_cfg
from yolo.model.checkpoint import load_checkpoint, model_from_checkpoint
from yolo.model.transfer import choose_anchors, transfer_state
from yolo.model.yolo import DetectionModel
from yolo.redact import redact
from yolo.storage import open_storage

LOG = logging.getLogger(__name__)
DEFAULT_CFG = "yolov5n.yaml"


@dataclass
class RunSetup:
    """What one run is built from (after resume merging); the loop's changing state lives elsewhere."""

    cfg: TrainConfig
    ctx: DistContext
    device: torch.device
    out: Path
    hyp: Hyp  # as given (the loss holds the gains scaled to nc, nl and imgsz)
    model: torch.nn.Module
    compute_loss: YoloLoss
    names: list[str]
    train_index: SplitIndex
    val_index: SplitIndex
    train_loader: TrainLoader
    train_dataset: TrainDataset
    run_id: str
    dataset_fingerprint: str
    identity_inputs: dict[str, Any]  # what the run identity hashed besides data, hyp and arguments
    resume_state: dict[str, Any] | None = None  # the last.pt being continued
    resumed_from: str | None = None
    leases: list[Lease] = field(default_factory=list)  # held on --out and --checkpoint-uri (rank 0)

    def release(self) -> None:
        for lease in self.leases:
            lease.release()
        self.leases.clear()

    def check_leases(self) -> None:
        """Before each checkpoint: stop if another writer took over one of our folders."""
        for lease in self.leases:
            lease.check()


# ---------------------------------------------------------------------------------------- prepare
def prepare_run(cfg: TrainConfig, ctx: DistContext) -> RunSetup:
    """Resolve resume, device, data, model, identity, leases and loader for `cfg`."""
    if not ctx.is_main:
        logging.getLogger("yolo").setLevel(logging.WARNING)
    explicit = None
    if cfg.resume is not None:
        validate_config(cfg, ctx.world_size)  # e.g. --weights with --resume, before anything is read
        explicit = resume.load_explicit(cfg)
        cfg = resume.merge_args(cfg, *explicit)
    if cfg.data is None:
        raise UserError("--data is required (unless --resume names a run to continue)")
    validate_config(cfg, ctx.world_size)
    if cfg.sync_bn and not ctx.enabled:
        LOG.info("--sync-bn only applies under torchrun with several processes; ignored")

    device = dist_utils.rank_device(ctx, select_device(cfg.device))
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
    dist_utils.init_distributed(ctx, device)
    _seed_everything(cfg.seed, cfg.deterministic, device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(processes=ctx.local_world_size))  # yolo.device's one rule
    if cfg.checkpoint_uri and ctx.is_main:
        root = cfg.checkpoint_uri.split(RUN_ID_PLACEHOLDER)[0].rstrip("/") or cfg.checkpoint_uri
        open_storage(root).check_access(write=True)  # unreachable/denied: one line, exit 2

    data, train_index, val_index, fingerprint = _load_data(cfg)
    if explicit is not None:
        resume.check_same_dataset(explicit, fingerprint)
    nc = 1 if cfg.single_cls else data.nc
    names = ["item"] if cfg.single_cls and len(data.names) != 1 else list(data.names)

    hyp = load_hyp(cfg.hyp)
    if explicit is not None:
        model, identity_inputs = resume.model_to_resume(explicit[0], nc)
        require_stride_multiple(cfg.imgsz, max(int(model.stride.max()), MAX_STRIDE))
    else:
        model, identity_inputs = _build_model(cfg, nc, hyp, train_index)
    model.names = names
    run_id = run_identity(fingerprint, identity_inputs["cfg"], hyp.to_dict(), {
        **{k: getattr(cfg, k) for k in cfg.RESULT_ARGS},
        "weights": identity_inputs["weights"],
        "anchors": identity_inputs["anchors"],
        **{k: getattr(cfg, k) for k in cfg.NEW_RESULT_ARGS if getattr(cfg, k)},  # old identities stay
    })
    cfg = replace(cfg, out=run_folders.choose_out(cfg, ctx, run_id))
    out = prepare_out_dir(cfg.out)

    if cfg.checkpoint_uri and RUN_ID_PLACEHOLDER in cfg.checkpoint_uri:
        # `--checkpoint-uri ROOT/{run_id}`: the run's identity names its folder, so any restart of the same
        # training (a KFP retry, a resubmission with the same data and parameters) finds and resumes it,
        # and changed parameters get a folder of their own.
        cfg = replace(cfg, checkpoint_uri=cfg.checkpoint_uri.replace(RUN_ID_PLACEHOLDER, run_id))
        LOG.info(redact(f"checkpoints of run {run_id}: {cfg.checkpoint_uri}"))

    leases = _take_leases(cfg, ctx, out, run_id)
    try:
        found = _resume_decision(cfg, ctx, out, run_id, explicit)
        if found is None:  # rank 0 looks, every rank stops (no rank left waiting in a collective)
            refusal = dist_utils.broadcast_object(run_folders.best_pt_refusal(out) if ctx.is_main else None, ctx)
            if refusal:
                raise UserError(refusal)
        model = _freeze(model, cfg.freeze)
        model = model.to(device).to(memory_format=torch.channels_last)
        if ctx.enabled and cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        detect = model.model[-1]
        loss_hyp = scale_loss_gains(hyp, nl=detect.nl, nc=nc, imgsz=cfg.imgsz)
        compute_loss = YoloLoss(model, loss_hyp, label_smoothing=cfg.label_smoothing)
        loader, dataset = create_train_loader(
            train_index, cfg.imgsz, cfg.batch_size // ctx.world_size, hyp, augment=True, rect=cfg.rect,
            workers=cfg.workers, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, cache=cfg.cache,
            cache_dir=out / "cache", image_weights=cfg.image_weights, quad=cfg.quad,
            stride=max(int(model.stride.max()), MAX_STRIDE),
        )  # fmt: skip
        if ctx.is_main:
            # as upstream's opt.yaml/hyp.yaml: the hyperparameter values used, not only the --hyp path
            write_text(out / "args.yaml", yaml.safe_dump({**cfg.to_dict(), "hyp": hyp.to_dict(),
                                                          "hyp_file": str(cfg.hyp) if cfg.hyp else None},
                                                         sort_keys=False))
            write_text(out / "hyp.yaml", yaml.safe_dump(hyp.to_dict(), sort_keys=False))
    except BaseException:
        for lease in leases:
            lease.release()
        raise
    return RunSetup(
        cfg=cfg, ctx=ctx, device=device, out=out, hyp=hyp, model=model, compute_loss=compute_loss, names=names,
        train_index=train_index, val_index=val_index, train_loader=loader, train_dataset=dataset, run_id=run_id,
        dataset_fingerprint=fingerprint, identity_inputs=identity_inputs,
        resume_state=found[0] if found else None, resumed_from=found[1] if found else None, leases=leases,
    )  # fmt: skip


def _take_leases(cfg: TrainConfig, ctx: DistContext, out: Path, run_id: str) -> list[Lease]:
    """One writer per run folder and per checkpoint URI (rank 0 writes; see yolo.engine.lease)."""
    if not ctx.is_main:
        return []
    leases: list[Lease] = []
    roots = [open_storage(out)] + ([open_storage(cfg.checkpoint_uri)] if cfg.checkpoint_uri else [])
    try:
        for storage in {s.uri: s for s in roots}.values():  # --checkpoint-uri may be --out itself
            leases.append(Lease(storage, run_id, str(out)).acquire())
    except BaseException:
        for lease in leases:
            lease.release()
        raise
    return leases


def _resume_decision(cfg: TrainConfig, ctx: DistContext, out: Path, run_id: str,
                     explicit: resume.Found | None) -> resume.Found | None:
    """The last.pt this run continues (explicit or this run's own unfinished one), checked; or None."""
    if ctx.is_main:
        # a train.json left by an earlier run must never pass for this one's: it is written again, last
        (out / "train.json").unlink(missing_ok=True)
    if explicit is not None:
        resume.check_resumable(explicit[0], cfg, explicit[1])
        found = explicit
    else:
        found = resume.automatic(cfg, ctx, out, run_id)
    if found is not None:
        ckpt, source = found
        refuse_nonfinite(ckpt, f"--resume {source}" if explicit else redact(source))
        LOG.info(redact(f"resuming run {run_id} from {source}: epoch {ckpt['train']['epoch']}, "
                        f"batch {ckpt['train']['iteration']}"))
        if ctx.is_main:
            resume.bring_best_along(source, out)
    return found


def _seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels


def _load_data(cfg: TrainConfig):
    data = load_data_config(cfg.data)
    for split in ("train", "val"):
        if split not in data.splits:
            raise UserError(f"{data.yaml_path}: no `{split}` split (training needs train and val)")
    splits = load_splits(data, ("train", "val"), index_dir=cfg.index, single_cls=cfg.single_cls)
    train_index, val_index = splits["train"], splits["val"]
    fingerprint = dataset_fingerprint_of(data, cfg.index, {"train": train_index.fingerprint,
                                                           "val": val_index.fingerprint})
    if train_index.labels:
        classes = np.concatenate([lb[:, 0] for lb in train_index.labels])
        if len(classes) and classes.max() >= (1 if cfg.single_cls else data.nc):
            raise UserError(f"{data.yaml_path}: label class {int(classes.max())} exceeds nc={data.nc}")
    return data, train_index, val_index, fingerprint


def _build_model(cfg: TrainConfig, nc: int, hyp: Hyp, train_index: SplitIndex) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model with nc from the data, weights transferred and anchors by priority:
    --anchors anchors.json > the --cfg's anchors (when --cfg is given) > the checkpoint's."""
    model_cfg = load_cfg(cfg.cfg) if cfg.cfg else None
    anchors_doc = read_anchors_json(cfg.anchors) if cfg.anchors is not None else None
    choice = choose_anchors(anchors_doc, model_cfg, cfg.imgsz, where=f"anchors file {cfg.anchors}")
    anchors_rows = choice.override
    anchors_digest = None
    if anchors_rows is not None:
        anchors_digest = file_digest(cfg.anchors)
        LOG.info(f"anchors from {cfg.anchors}")
    elif hyp.anchors:
        anchors_rows = int(hyp.anchors)  # upstream hyp `anchors`: a count, filled in by autoanchor

    weights_id = None
    if cfg.weights:
        ckpt = load_checkpoint(cfg.weights)
        refuse_nonfinite(ckpt, f"--weights {cfg.weights}")
        weights_id = file_digest(cfg.weights) if Path(cfg.weights).is_file() else str(cfg.weights)
        if model_cfg is not None:
            model = DetectionModel(model_cfg, nc=nc, anchors=anchors_rows)
            exclude = ("anchors",) if choice.exclude_from_transfer else ()
            transfer_state(model, ckpt["model"], exclude=exclude)  # logs "Transferred n/N items"
            LOG.info(f"weights from {cfg.weights}, architecture and anchors from "
                     f"{cfg.anchors if cfg.anchors else cfg.cfg}")
        else:
            model = model_from_checkpoint(ckpt, nc=nc, anchors=anchors_rows)
    else:
        model = DetectionModel(model_cfg or load_cfg(DEFAULT_CFG), nc=nc, anchors=anchors_rows)
        if not cfg.cfg:
            LOG.info(f"no --weights or --cfg: training {DEFAULT_CFG} from scratch")
    identity_cfg = dict(model.yaml)
    require_stride_multiple(cfg.imgsz, max(int(model.stride.max()), MAX_STRIDE))  # before anchors are fitted
    if cfg.autoanchor or isinstance(anchors_rows, int):
        check_anchors_inline(model, train_index, imgsz=cfg.imgsz, thr=hyp.anchor_t, seed=cfg.seed)
    return model, {"cfg": identity_cfg, "weights": weights_id, "anchors": anchors_digest}


def _freeze(model: torch.nn.Module, freeze: list[int]) -> torch.nn.Module:
    """--freeze N: layers 0..N-1; several numbers: those layers (upstream's `model.{i}.` prefixes)."""
    layers = list(range(freeze[0])) if len(freeze) == 1 else list(freeze)
    prefixes = tuple(f"model.{i}." for i in layers)
    frozen = 0
    for name, p in model.named_parameters():
        p.requires_grad_(True)
        if prefixes and name.startswith(prefixes):
            p.requires_grad_(False)
            frozen += 1
    if frozen:
        LOG.info(f"froze {frozen} parameter tensors in layers {layers[0]}..{layers[-1]}")
    return model
