"""Everything the train loop needs before its first step: device and seeds, data, model and anchors,
the run identity and the resume decision, loss, loaders, and the checkpoint format of this run.

Resume decision (see docs/architecture.md, "Training"):
- `--resume [SRC]` continues SRC's last.pt (a run folder, a .pt, or an s3:// run URI; no value: --out or
  --checkpoint-uri) with the arguments it was started with; only --epochs (extend), --device, --workers,
  --out, --checkpoint-uri and --tensorboard may change. A --data whose fingerprint differs is refused.
- otherwise an unfinished last.pt with this run's identity in --out (or at --checkpoint-uri) is continued
  automatically; a finished one or another identity starts clean, and the log says why.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler

from yolo.engine import distributed as dist_utils
from yolo.engine.distributed import DistContext
from yolo.engine.run_identity import file_digest, run_identity
from yolo.errors import UserError

LOG = logging.getLogger(__name__)
DEFAULT_CFG = "yolov5n.yaml"
LAST_KEY, BEST_KEY = "weights/last.pt", "weights/best.pt"
# Options that --resume may change; everything else comes from the checkpoint's arguments.
RUN_ID_PLACEHOLDER = "{run_id}"  # in --checkpoint-uri: replaced by the run identity
RESUME_OVERRIDES = ("device", "workers", "out", "checkpoint_uri", "tensorboard")


@dataclass
class RunSetup:
    cfg: Any  # TrainConfig (yolo.train), after resume merging
    ctx: DistContext
    device: torch.device
    out: Path
    hyp: Any  # yolo.hyp.Hyp, as given (loss gains unscaled)
    model: torch.nn.Module
    compute_loss: Any
    names: list[str]
    train_index: Any
    val_index: Any
    train_loader: DataLoader
    train_dataset: Any
    run_id: str
    dataset_fingerprint: str
    resume_state: dict | None = None
    resumed_from: str | None = None
    last_maps: np.ndarray | None = None

    # ------------------------------------------------------------------------------------ per epoch
    def epoch_batches(self, epoch: int, start: int = 0):
        """The batches of `epoch` from batch `start` on (same order and augmentations as from 0)."""
        loader = self.train_loader
        loader.set_epoch(epoch)
        if start == 0:
            return loader
        skip = _SkipSampler(loader.sampler, start * loader.batch_size)
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=skip, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
        )  # fmt: skip

    def evaluate(self, model: torch.nn.Module):
        """mAP of `model` on the val split with upstream's in-training settings (batch 2x, conf 0.001)."""
        from yolo.evaluate import EvalConfig, evaluate_model

        config = EvalConfig(
            imgsz=self.cfg.imgsz,
            batch_size=max(self.cfg.batch_size // self.ctx.world_size * 2, 1),
            single_cls=self.cfg.single_cls,
        )
        return evaluate_model(model, self.val_index, config, self.device, self.names)

    def plot_batch(self, imgs, targets, paths, path: Path) -> None:
        try:
            from yolo.plots.batches import plot_batch

            plot_batch(imgs, targets, self.names, path, paths=paths)
        except Exception as e:  # noqa: BLE001 - a plot must never stop training
            LOG.warning(f"{path.name} not drawn: {e}")

    # ------------------------------------------------------------------------------------ checkpoints
    def checkpoint_base(self, model: torch.nn.Module, half: bool) -> dict[str, Any]:
        """The fields best.pt and last.pt share: cfg, names, (EMA) weights, anchors, hyp, args, data."""
        from yolo.model.checkpoint import checkpoint_dict

        ckpt = checkpoint_dict(
            model, half=False, imgsz=self.cfg.imgsz, hyp=self.hyp.to_dict(), args=self.cfg.to_dict(),
            dataset_fingerprint=self.dataset_fingerprint, data_version=self.cfg.data_version, run_id=self.run_id,
        )  # fmt: skip
        ckpt["names"] = list(self.names)
        if half:  # anchors stay fp32: evolved anchors would lose digits in fp16
            ckpt["model"] = {k: v.half() if v.is_floating_point() and not k.endswith("anchors") else v
                             for k, v in ckpt["model"].items()}
        return ckpt

    @staticmethod
    def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
        from yolo.model.checkpoint import save_checkpoint

        save_checkpoint(path, ckpt)


class _SkipSampler(Sampler):
    """A sampler's keys for the current epoch without the first `skip` (a mid-epoch resume)."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.keys = list(sampler)[skip:]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


# ---------------------------------------------------------------------------------------- prepare
def prepare_run(cfg, ctx: DistContext) -> RunSetup:
    """Resolve resume, device, data, model, identity and loaders for TrainConfig `cfg`."""
    from yolo.device import select_device
    from yolo.files import prepare_out_dir

    if not ctx.is_main:
        logging.getLogger("yolo").setLevel(logging.WARNING)
    explicit = None
    if cfg.resume is not None:
        explicit = _load_explicit_resume(cfg)
        cfg = _merge_resume_args(cfg, *explicit)
    if cfg.data is None:
        raise UserError("--data is required (unless --resume names a run to continue)")
    if cfg.out is None:
        cfg = replace(cfg, out=Path("runs/train"))
    if cfg.sync_bn and not ctx.enabled:
        LOG.info("--sync-bn only applies under torchrun with several processes; ignored")

    device = dist_utils.rank_device(ctx, select_device(cfg.device))
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
    if cfg.batch_size % ctx.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                        f"({ctx.world_size})")
    dist_utils.init_distributed(ctx, device)
    _seed_everything(cfg.seed, cfg.deterministic, device)
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(ctx, cfg.deterministic))
    out = prepare_out_dir(cfg.out)
    if cfg.checkpoint_uri and ctx.is_main:
        from yolo.storage import open_storage

        root = cfg.checkpoint_uri.split(RUN_ID_PLACEHOLDER)[0].rstrip("/") or cfg.checkpoint_uri
        open_storage(root).check_access(write=True)  # unreachable/denied: one line, exit 2

    data, train_index, val_index, fingerprint = _load_data(cfg)
    if explicit is not None and data is not None:
        _check_same_dataset(explicit, fingerprint)
    nc = 1 if cfg.single_cls else data.nc
    names = ["item"] if cfg.single_cls and len(data.names) != 1 else list(data.names)

    from yolo.hyp import load_hyp

    hyp = load_hyp(cfg.hyp)
    model, identity_inputs = _build_model(cfg, nc, hyp, train_index, quiet=explicit is not None)
    model.names = names
    run_id = run_identity(fingerprint, identity_inputs["cfg"], hyp.to_dict(), {
        **{k: getattr(cfg, k) for k in cfg.RESULT_ARGS},
        "weights": identity_inputs["weights"],
        "anchors": identity_inputs["anchors"],
    })

    if cfg.checkpoint_uri and RUN_ID_PLACEHOLDER in cfg.checkpoint_uri:
        # `--checkpoint-uri ROOT/{run_id}`: the run's identity names its folder, so any restart of the same
        # training (a KFP retry, a resubmission with the same data and parameters) finds and resumes it,
        # and changed parameters get a folder of their own.
        cfg = replace(cfg, checkpoint_uri=cfg.checkpoint_uri.replace(RUN_ID_PLACEHOLDER, run_id))
        LOG.info(f"checkpoints of run {run_id}: {cfg.checkpoint_uri}")

    resume_state, resumed_from = None, None
    if explicit is not None:
        resume_state, resumed_from = explicit
        _check_resumable(resume_state, cfg, resumed_from)
    else:
        found = _automatic_resume(cfg, ctx, out, run_id)
        if found is not None:
            resume_state, resumed_from = found
    if resume_state is not None:
        LOG.info(f"resuming run {run_id} from {resumed_from}: epoch {resume_state['train']['epoch']}, "
                 f"batch {resume_state['train']['iteration']}")
        if ctx.is_main:
            _bring_best_along(resumed_from, out)

    model = _freeze(model, cfg.freeze)
    model = model.to(device).to(memory_format=torch.channels_last)
    if ctx.enabled and cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    from yolo.loss import YoloLoss, scale_loss_gains

    detect = model.model[-1]
    loss_hyp = scale_loss_gains(hyp, nl=detect.nl, nc=nc, imgsz=cfg.imgsz)
    compute_loss = YoloLoss(model, loss_hyp, label_smoothing=cfg.label_smoothing)

    from yolo.data.loader import create_train_loader

    stride = max(int(model.stride.max()), 32)
    if cfg.imgsz % stride:
        raise UserError(f"--imgsz {cfg.imgsz} must be a multiple of the model's max stride {stride}")
    loader, dataset = create_train_loader(
        train_index, cfg.imgsz, cfg.batch_size // ctx.world_size, hyp, augment=True, rect=cfg.rect,
        workers=cfg.workers, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, cache=cfg.cache,
        cache_dir=out / "cache", image_weights=cfg.image_weights, quad=cfg.quad, stride=stride,
    )  # fmt: skip
    if ctx.is_main:
        from yolo.files import write_text

        write_text(out / "args.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return RunSetup(
        cfg=cfg, ctx=ctx, device=device, out=out, hyp=hyp, model=model, compute_loss=compute_loss, names=names,
        train_index=train_index, val_index=val_index, train_loader=loader, train_dataset=dataset, run_id=run_id,
        dataset_fingerprint=fingerprint, resume_state=resume_state, resumed_from=resumed_from,
    )  # fmt: skip


def _cpu_threads(ctx: DistContext, deterministic: bool) -> int:
    """The cores this process may use (shared between local ranks), by yolo.device.cpu_threads' rule."""
    from yolo.device import cpu_threads

    threads = dist_utils.cpu_threads_per_rank(ctx)
    return cpu_threads(threads, threads * max(1, ctx.local_world_size), adapt_to_load=not deterministic)


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


def _load_data(cfg):
    from yolo.data.dataset import load_data_config, load_split
    from yolo.data.index import dataset_fingerprint_of

    data = load_data_config(cfg.data)
    for split in ("train", "val"):
        if split not in data.splits:
            raise UserError(f"{data.yaml_path}: no `{split}` split (training needs train and val)")
    train_index = load_split(data, "train", index_dir=cfg.index, single_cls=cfg.single_cls)
    val_index = load_split(data, "val", index_dir=cfg.index, single_cls=cfg.single_cls)
    fingerprint = dataset_fingerprint_of(data, cfg.index, {"train": train_index.fingerprint,
                                                           "val": val_index.fingerprint})
    if train_index.labels:
        classes = np.concatenate([lb[:, 0] for lb in train_index.labels])
        if len(classes) and classes.max() >= (1 if cfg.single_cls else data.nc):
            raise UserError(f"{data.yaml_path}: label class {int(classes.max())} exceeds nc={data.nc}")
    return data, train_index, val_index, fingerprint


# ---------------------------------------------------------------------------------------- model
def _build_model(cfg, nc: int, hyp, train_index, quiet: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model with nc from the data, weights transferred and anchors by priority:
    --anchors anchors.json > the --cfg's anchors (when --cfg is given) > the checkpoint's."""
    from yolo.model.cfg import load_cfg
    from yolo.model.yolo import DetectionModel

    anchors_rows = None
    anchors_digest = None
    if cfg.anchors is not None:
        from yolo.anchors import anchors_for_imgsz, load_anchors_json

        fitted_imgsz, rows = load_anchors_json(cfg.anchors)
        anchors_rows = anchors_for_imgsz(rows, fitted_imgsz, cfg.imgsz).tolist()
        anchors_digest = file_digest(cfg.anchors)
        LOG.info(f"anchors from {cfg.anchors}")
    elif hyp.anchors:
        anchors_rows = int(hyp.anchors)  # upstream hyp `anchors`: a count, filled in by autoanchor

    weights_id = None
    if cfg.weights:
        from yolo.model.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(cfg.weights)
        weights_id = file_digest(cfg.weights) if Path(cfg.weights).is_file() else str(cfg.weights)
        if cfg.cfg:
            from yolo.model.transfer import transfer_state

            model = DetectionModel(load_cfg(cfg.cfg), nc=nc, anchors=anchors_rows)
            transfer_state(model, ckpt["model"], exclude=("anchors",))  # logs "Transferred n/N items"
            LOG.info(f"weights from {cfg.weights}, architecture and anchors from "
                     f"{cfg.anchors if cfg.anchors else cfg.cfg}")
        else:
            model = model_from_checkpoint(ckpt, nc=nc, anchors=anchors_rows)
    else:
        model = DetectionModel(load_cfg(cfg.cfg or DEFAULT_CFG), nc=nc, anchors=anchors_rows)
        if not cfg.cfg and not quiet:
            LOG.info(f"no --weights or --cfg: training {DEFAULT_CFG} from scratch")
    identity_cfg = dict(model.yaml)

    if cfg.autoanchor or isinstance(anchors_rows, int):
        from yolo.anchors import check_anchors_inline

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


# ---------------------------------------------------------------------------------------- resume
def _read_last(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which and why
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "train" not in ckpt or "run_id" not in ckpt:
        raise UserError(f"{path}: not a last.pt of this project (no training state); "
                        f"use --weights {path} to start a new run from its weights")
    return ckpt


def _fetch_remote_last(uri: str, dest: Path | None = None) -> tuple[dict[str, Any], str] | None:
    """Download and read the last.pt at a run URI (or a .pt URI); kept at `dest` when given."""
    from yolo.storage import open_storage

    base, key = (uri.rsplit("/", 1)[0], uri.rsplit("/", 1)[1]) if uri.endswith(".pt") else (uri, LAST_KEY)
    storage = open_storage(base)
    if not storage.exists(key):
        return None
    if dest is not None:
        return _read_last(storage.get(key, dest)), storage.uri_for(key)
    with tempfile.TemporaryDirectory(prefix="yolo-resume-") as tmp:
        local = storage.get(key, Path(tmp) / "last.pt")
        return _read_last(local), storage.uri_for(key)


def _bring_best_along(resumed_from: str, out: Path) -> None:
    """Copy best.pt from beside the last.pt a run resumes into `out` (a fresh pod's folder has none): when
    the remaining epochs do not improve, the run must still end with the best.pt of its earlier ones."""
    from yolo.storage import open_storage

    best = out / BEST_KEY
    folder, _, name = resumed_from.rpartition("/")
    if best.is_file() or not folder or name != "last.pt":
        return
    storage = open_storage(folder)
    if storage.exists("best.pt"):
        storage.get("best.pt", best)
        LOG.info(f"restored {best} from {storage.uri_for('best.pt')}")


def _load_explicit_resume(cfg) -> tuple[dict[str, Any], str]:
    from yolo.storage import is_remote

    source = cfg.resume or cfg.checkpoint_uri or (str(cfg.out) if cfg.out is not None else "")
    if not source:
        raise UserError("--resume needs a run folder, a last.pt or an s3:// URI (or --out / --checkpoint-uri)")
    if is_remote(source):
        found = _fetch_remote_last(source)
        if found is None:
            raise UserError(f"--resume {source}: no {LAST_KEY} there")
        return found
    path = Path(source)
    candidates = [path] if path.suffix == ".pt" else [path / LAST_KEY, path / "last.pt"]
    for candidate in candidates:
        if candidate.is_file():
            return _read_last(candidate), str(candidate)
    raise UserError(f"--resume {source}: no last.pt found (looked for {', '.join(map(str, candidates))})")


def _merge_resume_args(cfg, ckpt: dict[str, Any], source: str):
    """The checkpoint's own arguments, with the few options a resume may change. Without --out, a local
    last.pt continues in its own run folder; a remote one in the folder its run was started with."""
    saved = dict(ckpt.get("args") or {})
    if cfg.out is None and "://" not in source:
        last = Path(source)
        saved["out"] = str(last.parent.parent if last.parent.name == "weights" else last.parent)
    known = {f.name for f in fields(cfg)}
    values = {k: v for k, v in saved.items() if k in known}
    for key in ("data", "hyp", "anchors", "index"):
        if values.get(key):
            values[key] = Path(values[key])
    for key in RESUME_OVERRIDES:
        given = getattr(cfg, key)
        if given is not None and given is not False:
            values[key] = given
        elif key not in values:
            values[key] = getattr(type(cfg)(), key)
    if cfg.data is not None:
        values["data"] = cfg.data  # moved dataset: allowed when its fingerprint is the same (checked later)
    if cfg.epochs_given:
        values["epochs"] = cfg.epochs
    elif values.get("epochs") is None:
        values["epochs"] = type(cfg)().epochs
    values["resume"] = None
    values["epochs_given"] = True
    merged = type(cfg)(**values)
    if merged.out is None:
        merged = replace(merged, out=Path("runs/train"))
    return merged


def _check_same_dataset(explicit: tuple[dict[str, Any], str], fingerprint: str) -> None:
    ckpt, source = explicit
    if ckpt.get("dataset_fingerprint") not in (None, fingerprint):
        raise UserError(
            f"--resume {source}: that run was trained on another dataset (fingerprint "
            f"{str(ckpt['dataset_fingerprint'])[:12]}, --data has {fingerprint[:12]}); to fine-tune from its "
            f"weights on this data start a new run with --weights {source}"
        )


def _check_resumable(ckpt: dict[str, Any], cfg, source: str) -> None:
    st = ckpt["train"]
    done = int(st["epoch"])
    if st.get("finished") and cfg.epochs <= done:
        raise UserError(f"--resume {source}: the run finished ({done} epochs); pass --epochs N with N > {done} "
                        f"to train it further")
    if cfg.epochs < done:
        raise UserError(f"--resume {source}: --epochs {cfg.epochs} is less than the {done} epochs already run")


def _automatic_resume(cfg, ctx: DistContext, out: Path, run_id: str) -> tuple[dict[str, Any], str] | None:
    """An unfinished last.pt of this very run in --out or at --checkpoint-uri, or None (and why)."""
    decision = None
    if ctx.is_main:
        decision = _find_own_last(cfg, out, run_id)
    decision = dist_utils.broadcast_object(decision, ctx)
    if decision is None:
        return None
    path, origin = decision
    if Path(path).is_file():
        return _read_last(Path(path)), origin
    # another node of a multi-node job: the run folder is not shared, the URI is
    found = _fetch_remote_last(cfg.checkpoint_uri) if cfg.checkpoint_uri else None
    if found is None:
        raise UserError(f"rank {ctx.rank}: cannot read {path} (not on this node) and no --checkpoint-uri")
    return found


def _find_own_last(cfg, out: Path, run_id: str) -> tuple[str, str] | None:
    """(local path, where it came from) of this run's unfinished last.pt, or None."""
    local = out / LAST_KEY
    if local.is_file():
        if _judge(_read_last_quiet(local), run_id, str(local)):
            return str(local), str(local)
    if cfg.checkpoint_uri:
        # download beside the local last.pt; when it is this run's state it becomes the local last.pt
        staged = out / "weights" / ".remote-last.pt"
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            found = _fetch_remote_last(cfg.checkpoint_uri, staged)
            if found is not None and _judge(found[0], run_id, found[1]):
                os.replace(staged, local)
                LOG.info(f"restored {local} from {found[1]}")
                return str(local), found[1]
        finally:
            staged.unlink(missing_ok=True)
    return None


def _read_last_quiet(path: Path) -> dict[str, Any] | None:
    try:
        return _read_last(path)
    except UserError as e:
        LOG.info(f"not resuming: {e}")
        return None


def _judge(ckpt: dict[str, Any] | None, run_id: str, where: str) -> bool:
    """True when `ckpt` is an unfinished state of run `run_id`; otherwise log why a new run starts."""
    if ckpt is None:
        return False
    if ckpt.get("run_id") != run_id:
        LOG.info(f"{where} belongs to another run ({ckpt.get('run_id')}: different data, cfg, hyp or arguments); "
                 f"starting a new run {run_id} (its outputs are replaced)")
        return False
    if ckpt["train"].get("finished"):
        LOG.info(f"{where}: this run already finished; starting it again from scratch "
                 f"(use --resume --epochs N to train it further)")
        return False
    return True
