"""Resume: which last.pt a run continues, with which arguments, and how its state is put back.

- `--resume [SRC]` continues SRC's last.pt (a run folder, a .pt, or an s3:// run URI; no value: --out or
  --checkpoint-uri) with the arguments it was started with; only --epochs (extend), --device, --workers
  and --tensorboard may change. A --data whose fingerprint differs is refused. Where the run writes
  (--out), mirrors (--checkpoint-uri) and what it fetches (--weights) never come from the checkpoint:
  they come from the command line (or SRC's own location), and a checkpoint that says otherwise is
  reported in a warning, not obeyed. The model is rebuilt from last.pt itself; nothing is downloaded.
- otherwise an unfinished last.pt with this run's identity in --out (or at --checkpoint-uri) is continued
  automatically; a finished one or another identity starts clean, and the log says why.

Stored last.pt files are read through the run's storage (yolo.storage) and must verify against the
SHA-256 recorded at upload unless --trust-unverified. See docs/architecture.md, "Training" and "What a
checkpoint may decide".
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from yolo.engine import distributed as dist_utils
from yolo.engine.config import TrainConfig
from yolo.engine.distributed import DistContext
from yolo.engine.ema import ModelEMA, unwrap
from yolo.engine.state import TrainState
from yolo.errors import UserError
from yolo.model.checkpoint import load_weights_only, model_from_checkpoint
from yolo.redact import redact
from yolo.storage import is_remote, open_storage

LOG = logging.getLogger(__name__)
LAST_KEY, BEST_KEY = "weights/last.pt", "weights/best.pt"
DEFAULT_OUT = "runs/train"  # where a run resumed from a remote last.pt writes when no --out is given
# Options that --resume may change; the rest of the run's arguments come from the checkpoint, except
# PLACES (where the run writes, mirrors and fetches from), which only the command line decides.
RESUME_OVERRIDES = ("device", "workers", "tensorboard")
PLACES = ("out", "checkpoint_uri", "weights", "project", "name", "exist_ok")
Found = tuple[dict[str, Any], str]  # (last.pt's dict, where it was read from)


def read_last(path: Path) -> dict[str, Any]:
    try:
        ckpt = load_weights_only(path)  # budgets checked before anything is inflated
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which and why
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "train" not in ckpt or "run_id" not in ckpt:
        raise UserError(f"{path}: not a last.pt of this project (no training state); "
                        f"use --weights {path} to start a new run from its weights")
    return ckpt


def fetch_remote_last(uri: str, trust_unverified: bool, dest: Path | None = None) -> Found | None:
    """Download and read the last.pt at a run URI (or a .pt URI); kept at `dest` when given. Its SHA-256
    must have been recorded at upload (a rewritten object is refused) unless `trust_unverified`."""
    base, key = (uri.rsplit("/", 1)[0], uri.rsplit("/", 1)[1]) if uri.endswith(".pt") else (uri, LAST_KEY)
    storage = open_storage(base)
    if not storage.exists(key):
        return None
    if dest is not None:
        return read_last(storage.get(key, dest, require_checksum=not trust_unverified)), storage.uri_for(key)
    with tempfile.TemporaryDirectory(prefix="yolo-resume-") as tmp:
        local = storage.get(key, Path(tmp) / "last.pt", require_checksum=not trust_unverified)
        return read_last(local), storage.uri_for(key)


def load_explicit(cfg: TrainConfig) -> Found:
    """The last.pt `--resume` names (a run folder, a .pt or an s3:// run URI), and where it was read."""
    source = cfg.resume or cfg.checkpoint_uri or (str(cfg.out) if cfg.out is not None else "")
    if not source:
        raise UserError("--resume needs a run folder, a last.pt or an s3:// URI (or --out / --checkpoint-uri)")
    if is_remote(source):
        found = fetch_remote_last(source, cfg.trust_unverified)
        if found is None:
            raise UserError(f"--resume {source}: no {LAST_KEY} there")
        return found
    path = Path(source)
    candidates = [path] if path.suffix == ".pt" else [path / LAST_KEY, path / "last.pt"]
    for candidate in candidates:
        if candidate.is_file():
            return read_last(candidate), str(candidate)
    raise UserError(f"--resume {source}: no last.pt found (looked for {', '.join(map(str, candidates))})")


def merge_args(cfg: TrainConfig, ckpt: dict[str, Any], source: str) -> TrainConfig:
    """The checkpoint's own arguments, with the few options a resume may change. PLACES come from the
    command line: --out, else a local last.pt's own run folder, else the default; --checkpoint-uri, else
    an s3:// SRC's own run folder; --weights not at all (the model comes from last.pt). Where the
    checkpoint names other places, a warning says so and they are ignored."""
    saved = dict(ckpt.get("args") or {}) if isinstance(ckpt.get("args"), dict) else {}
    known = {f.name for f in fields(cfg)}
    values = {k: v for k, v in saved.items() if k in known and k not in PLACES}
    for key in ("data", "hyp", "anchors", "index"):
        if values.get(key):
            values[key] = Path(values[key])
    for key in RESUME_OVERRIDES:
        given = getattr(cfg, key)
        if given is not None and given is not False:
            values[key] = given
        elif key not in values:
            values[key] = getattr(TrainConfig(), key)
    if cfg.data is not None:
        values["data"] = cfg.data  # moved dataset: allowed when its fingerprint is the same (checked later)
    if cfg.epochs_given:
        values["epochs"] = cfg.epochs
    elif values.get("epochs") is None:
        values["epochs"] = TrainConfig().epochs
    values["out"] = cfg.out if cfg.out is not None else _own_run_folder(source)
    values["checkpoint_uri"] = cfg.checkpoint_uri or _own_run_uri(source)
    values["weights"] = None
    values["trust_unverified"] = cfg.trust_unverified  # a checkpoint cannot vouch for itself
    values["resume"] = None
    values["epochs_given"] = True
    merged = TrainConfig(**values)
    _report_ignored_places(saved, merged, source)
    return merged


def _own_run_folder(source: str) -> Path:
    """A local last.pt continues in the run folder it lies in; a remote one in the default folder."""
    if "://" in source:
        return Path(DEFAULT_OUT)
    last = Path(source)
    return last.parent.parent if last.parent.name == "weights" else last.parent


def _own_run_uri(source: str) -> str | None:
    """An s3:// SRC keeps mirroring to its own run folder (s3://b/run or s3://b/run/weights/last.pt)."""
    if not is_remote(source):
        return None
    base = source.rsplit("/", 1)[0] if source.endswith(".pt") else source.rstrip("/")
    return base[: -len("/weights")] if base.endswith("/weights") else base


def _report_ignored_places(saved: dict[str, Any], cfg: TrainConfig, source: str) -> None:
    """A checkpoint may not decide where a run writes, mirrors or fetches from: say what was ignored."""
    for key, flag in (("out", "--out"), ("checkpoint_uri", "--checkpoint-uri"), ("weights", "--weights")):
        named = saved.get(key)
        used = getattr(cfg, key)
        if named in (None, "") or str(named) == str(used):
            continue
        shown = redact(str(named))[:200]
        if key == "weights":
            LOG.warning(f"--resume {redact(source)}: its arguments name weights {shown!r}; not fetched (the model "
                        f"continues from last.pt)")
        else:
            LOG.warning(f"--resume {redact(source)}: its arguments name {flag} {shown!r}; ignored, this run uses "
                        f"{redact(str(used)) if used else 'none'} (only the command line decides {flag})")


def check_same_dataset(explicit: Found, fingerprint: str) -> None:
    ckpt, source = explicit
    if ckpt.get("dataset_fingerprint") not in (None, fingerprint):
        raise UserError(
            f"--resume {source}: that run was trained on another dataset (fingerprint "
            f"{str(ckpt['dataset_fingerprint'])[:12]}, --data has {fingerprint[:12]}); to fine-tune from its "
            f"weights on this data start a new run with --weights {source}"
        )


def check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, source: str) -> None:
    st = ckpt["train"]
    done = int(st["epoch"])
    if st.get("finished") and cfg.epochs <= done:
        raise UserError(f"--resume {source}: the run finished ({done} epochs); pass --epochs N with N > {done} "
                        f"to train it further")
    if cfg.epochs < done:
        raise UserError(f"--resume {source}: --epochs {cfg.epochs} is less than the {done} epochs already run")


def automatic(cfg: TrainConfig, ctx: DistContext, out: Path, run_id: str) -> Found | None:
    """An unfinished last.pt of this very run in --out or at --checkpoint-uri, or None (and why)."""
    decision = None
    if ctx.is_main:
        decision = find_own_last(cfg, out, run_id)
    decision = dist_utils.broadcast_object(decision, ctx)
    if decision is None:
        return None
    path, origin = decision
    if Path(path).is_file():
        return read_last(Path(path)), origin
    # another node of a multi-node job: the run folder is not shared, the URI is
    found = fetch_remote_last(cfg.checkpoint_uri, cfg.trust_unverified) if cfg.checkpoint_uri else None
    if found is None:
        raise UserError(f"rank {ctx.rank}: cannot read {path} (not on this node) and no --checkpoint-uri")
    return found


def find_own_last(cfg: TrainConfig, out: Path, run_id: str) -> tuple[str, str] | None:
    """(local path, where it came from) of this run's unfinished last.pt, or None."""
    local = out / LAST_KEY
    if local.is_file():
        if _judge(read_last_quiet(local), run_id, str(local)):
            return str(local), str(local)
    if cfg.checkpoint_uri:
        # download beside the local last.pt; when it is this run's state it becomes the local last.pt
        staged = out / "weights" / ".remote-last.pt"
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            found = fetch_remote_last(cfg.checkpoint_uri, cfg.trust_unverified, staged)
            if found is not None and _judge(found[0], run_id, found[1]):
                os.replace(staged, local)
                LOG.info(f"restored {local} from {found[1]}")
                return str(local), found[1]
        finally:
            staged.unlink(missing_ok=True)
    return None


def read_last_quiet(path: Path) -> dict[str, Any] | None:
    try:
        return read_last(path)
    except UserError as e:
        LOG.info(f"not resuming: {e}")
        return None


def _judge(ckpt: dict[str, Any] | None, run_id: str, where: str) -> bool:
    """True when `ckpt` is an unfinished state of run `run_id`; otherwise log why a new run starts."""
    if ckpt is None:
        return False
    if ckpt.get("run_id") != run_id:
        LOG.info(f"{where} belongs to another run ({str(ckpt.get('run_id'))[:32]!r}: different data, cfg, hyp or arguments); "
                 f"starting a new run {run_id} (its outputs are replaced)")
        return False
    if ckpt["train"].get("finished"):
        LOG.info(f"{where}: this run already finished; starting it again from scratch "
                 f"(use --resume --epochs N to train it further)")
        return False
    return True


def model_to_resume(ckpt: dict[str, Any], nc: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """--resume: the model rebuilt from last.pt's own cfg and weights (nothing read or fetched from the
    places its arguments name). The identity inputs are the ones the run recorded; a last.pt written
    before they were recorded gets its cfg and the recorded weights/anchors names as labels."""
    if not isinstance(ckpt.get("cfg"), dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError("--resume: that last.pt holds no model cfg and weights to continue from")
    model = model_from_checkpoint(ckpt, nc=nc)
    recorded = ckpt.get("identity") if isinstance(ckpt.get("identity"), dict) else {}
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    identity = {
        "cfg": recorded.get("cfg") if isinstance(recorded.get("cfg"), dict) else dict(model.yaml),
        "weights": recorded.get("weights", args.get("weights")),
        "anchors": recorded.get("anchors", args.get("anchors")),
    }
    return model, {k: (v if v is None or isinstance(v, dict) else str(v)) for k, v in identity.items()}


def restore_parts(ckpt: dict[str, Any], model: torch.nn.Module, ema: ModelEMA | None,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batches_per_epoch: int,
                  device: torch.device) -> TrainState:
    """Put last.pt's training state back into the loop's parts; returns the train state (the RNG states
    are restored by the caller, last, just before the first step)."""
    st = ckpt["train"]
    unwrap(model).load_state_dict(st["model"])
    if ema is not None:
        ema.ema.load_state_dict(ckpt["model"])
        ema.updates = int(st["ema_updates"])
    if st.get("optimizer") is not None:
        optimizer.load_state_dict(st["optimizer"])
    else:  # a finished run's last.pt (stripped): the extension starts with empty momentum buffers
        LOG.info("last.pt of a finished run holds no optimizer state: the optimizer starts afresh")
    if st.get("scaler"):
        scaler.load_state_dict(st["scaler"])
    if int(st["iteration"]) and int(st["batches_per_epoch"]) != batches_per_epoch:
        # another world size or batch size changed the batches per epoch: restart this epoch
        LOG.warning(f"batches per epoch changed ({st['batches_per_epoch']} -> {batches_per_epoch}); "
                    f"epoch {int(st['epoch'])} restarts from its first batch")
        st = {**st, "iteration": 0, "grads": None, "mloss": torch.zeros(3)}
    if st.get("grads") is not None:
        for p, g in zip(model.parameters(), st["grads"], strict=True):
            p.grad = None if g is None else g.to(p.device)
    return TrainState.from_dict(st, device)


def bring_best_along(resumed_from: str, out: Path) -> None:
    """Copy best.pt from beside the last.pt a run resumes into `out` (a fresh pod's folder has none): when
    the remaining epochs do not improve, the run must still end with the best.pt of its earlier ones."""
    best = out / BEST_KEY
    folder, _, name = resumed_from.rpartition("/")
    if best.is_file() or not folder or name != "last.pt":
        return
    storage = open_storage(folder)
    if storage.exists("best.pt"):
        storage.get("best.pt", best)
        LOG.info(redact(f"restored {best} from {storage.uri_for('best.pt')}"))
