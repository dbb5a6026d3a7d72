"""Fine-tuning one fold with MONAI's engines (``SupervisedTrainer`` / ``SupervisedEvaluator``).

Handlers: validation every epoch (AUC, accuracy, loss for malignancy; MSE per biomarker for
regression), the learning-rate schedule (exponential per epoch, cyclic per iteration), the best
checkpoint by the validation key metric (in our checkpoint format, loadable with
``weights_only=True`` by ``ViTModel.from_checkpoint``), early stopping, a per-epoch training state
for resuming, and a progress bar. Seeded and deterministic on the CPU: the sample order and every
random augmentation are keyed to (seed, epoch), so a resumed run equals an uninterrupted one.
Under ``torchrun`` the model is wrapped in DDP and the training set is sharded.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lidc_cdam.distributed import Process, current_process
from lidc_cdam.io import atomic_write, save_torch, write_json
from lidc_cdam.models.loading import read_checkpoint, save_checkpoint
from lidc_cdam.models.vit import ViTModel
from lidc_cdam.train.backbones import build_model, set_trainable
from lidc_cdam.train.config import TrainConfig
from lidc_cdam.train.step import AutocastInferer, Precision, TrainStep, choose_precision

log = logging.getLogger(__name__)


@dataclass
class FoldData:
    """What one fold trains on: datasets of ``{"image": [3, H, W], "label": [K]}`` items, the
    output names, and the statistics (fitted on the training part only) the model must carry."""

    train: Dataset
    val: Dataset
    output_names: list[str]
    fold: int
    test: Dataset | None = None  # scored once with the best checkpoint
    #: the test nodules' phantom training variants (every rating drawn on its own): scored once too, their R^2
    #: says whether the model reads each biomarker's own cause rather than cues correlated with it
    test_variants: Dataset | None = None
    trust: Dataset | None = None  # the training part without augmentation (trust flag); default ``train``
    #: the training part's crop files (``[32, 32, 32]`` HU), for the version-3 trust flag (the crop's slices)
    trust_crops: list[str] | None = None
    input_stats: dict[str, Any] = field(default_factory=dict)
    target_stats: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class WeightedTargetLoss(torch.nn.Module):
    """``base`` (element-wise) averaged over the batch, then over the targets ``[B, T]`` with ``weights`` (the
    weighted mean: equal weights give the plain mean)."""

    def __init__(self, base: torch.nn.Module, weights: list[float]) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32) / sum(weights))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.base(pred, target).mean(0) * self.weights.to(pred.dtype)).sum()


def _loss(config: TrainConfig, output_names: list[str] | None = None) -> torch.nn.Module:
    kind = {"bce": torch.nn.BCEWithLogitsLoss, "huber": torch.nn.HuberLoss, "mse": torch.nn.MSELoss}[config.loss_name]
    if not config.target_weights:
        return kind()
    weights = [float(config.target_weights.get(name, 1.0)) for name in output_names or []]
    return WeightedTargetLoss(kind(reduction="none"), weights)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    s = config.schedule
    if s.type == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=s.gamma), True
    if s.type == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=s.base_lr, max_lr=s.max_lr,
                                                 step_size_up=s.step_size_up, mode=s.mode,
                                                 cycle_momentum=False), False
    return None, True


def prepare_batch(batchdata: dict[str, Any], device: torch.device | None = None, non_blocking: bool = False,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, target [B, K])`` from a batch: the ``target`` key where the items have one (the
    LIDC datasets: malignancy or the standardised biomarkers), else ``label``."""
    target = batchdata["target"] if "target" in batchdata else batchdata["label"]
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    target = target.float().reshape(len(image), -1).to(device=device, non_blocking=non_blocking)
    return image, target


def _stack(output: Any, key: str) -> torch.Tensor:
    if isinstance(output, dict):
        return output[key]
    return torch.stack([o[key] for o in output])


class FoldKeeper:
    """Best checkpoint, history, early stopping and the resumable training state of one fold."""

    def __init__(self, config: TrainConfig, out: Path, key: str, higher_is_better: bool, process: Process,
                 model_meta: dict[str, Any]) -> None:
        self.config, self.out, self.key, self.higher = config, out, key, higher_is_better
        self.process, self.model_meta = process, model_meta
        self.best = -math.inf if higher_is_better else math.inf
        self.best_loss = math.inf
        self.best_epoch = 0
        self.stale = 0
        self.history: list[dict[str, Any]] = []
        self.epoch_losses: list[torch.Tensor] = []  # detached, on the device: read once per epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_loss": self.best_loss, "best_epoch": self.best_epoch, "stale": self.stale,
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.best_loss = float(state["best_loss"])
        self.stale, self.history = int(state["stale"]), list(state["history"])

    def validated(self, trainer, evaluator, model: ViTModel) -> None:
        """After each validation: record, keep the best model, stop early when stale."""
        metrics = {k: _plain(v) for k, v in evaluator.state.metrics.items()}
        epoch = trainer.state.epoch
        train_loss = float(torch.stack(self.epoch_losses).double().mean()) if self.epoch_losses else math.nan
        row = {"epoch": epoch, "train_loss": train_loss,
               "lr": trainer.optimizer.param_groups[0]["lr"], **metrics}
        self.history.append(row)
        self.epoch_losses = []
        value, loss = float(metrics[self.key]), float(metrics.get("val_loss", math.inf))
        improved = value > self.best if self.higher else value < self.best
        if value == self.best and loss < self.best_loss:  # ties (e.g. AUC 1.0) go to the lower loss
            improved = True
        if improved or not self.best_epoch:
            self.best, self.best_loss, self.best_epoch, self.stale = value, loss, epoch, 0
            if self.process.main:
                meta = {**self.model_meta, "epoch": epoch, "val_metrics": metrics}
                save_checkpoint(model, self.out / "best.pt", meta=meta)
        else:
            self.stale += 1
        if self.config.early_stopping and self.stale >= self.config.early_stopping:
            log.info("fold %s: early stop at epoch %d (best %s = %.4f at epoch %d)",
                     self.model_meta.get("fold"), epoch, self.key, self.best, self.best_epoch)
            trainer.terminate()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else float(value)
    return float(value) if isinstance(value, int | float | np.floating) else value


def train_fold(config: TrainConfig, data: FoldData, out: str | Path, *, progress: bool = True,
               process: Process | None = None, stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Fine-tune on ``data.train``, validate on ``data.val`` every epoch, write ``out/best.pt``,
    ``out/history.csv`` and ``out/result.json``; resume from ``out/state.pt`` when it exists.

    ``stop_after_epochs`` ends the run early as an interruption would (tests of resuming).
    """
    import ignite.metrics
    from monai.data import DataLoader
    from monai.data.utils import set_rnd
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import ROCAUC, LrScheduleHandler, MeanSquaredError, ValidationHandler
    from monai.utils import set_determinism
    from torch.utils.data.distributed import DistributedSampler

    process = process or current_process()
    out = Path(out)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # ignite logs every epoch at INFO
        logging.getLogger("ignite").setLevel(logging.WARNING)
    set_determinism(seed=config.seed)
    from lidc_cdam.models.provenance import training_provenance

    model_meta = {
        "fold": data.fold, "task": config.task, "train_config": config.to_dict(),
        "config_fingerprint": config.fingerprint(), "input_stats": data.input_stats,
        "target_stats": data.target_stats, "data": data.info,
        "provenance": training_provenance(data.info, fold=data.fold, preset=getattr(config, "name", None)),
    }
    model = build_model(config, data.output_names, meta=model_meta)
    params = set_trainable(model, config)
    model.to(process.device)
    network: torch.nn.Module = model
    if process.world > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[process.device.index] if process.device.type == "cuda" else None)
    sampler = DistributedSampler(data.train, num_replicas=process.world, rank=process.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    pin = process.device.type == "cuda"  # page-locked batches: asynchronous (non_blocking) copies to the GPU
    train_loader = DataLoader(data.train, batch_size=config.batch_size, sampler=sampler,
                              num_workers=config.data.num_workers, pin_memory=pin)
    val_loader = DataLoader(data.val, batch_size=config.batch_size, shuffle=False, num_workers=config.data.num_workers,
                            pin_memory=pin)
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler, per_epoch = _scheduler(config, optimizer)
    loss_fn = _loss(config, data.output_names).to(process.device)
    precision = choose_precision(config.amp, process.device)
    train_step = TrainStep(network, optimizer, loss_fn, precision)

    if config.task == "malignancy":
        key, higher = "val_auc", True

        def probs(o):
            return torch.sigmoid(_stack(o, "pred").float()), _stack(o, "label")

        key_metric = {"val_auc": ROCAUC(output_transform=probs)}
        extra = {
            "val_acc": ignite.metrics.Accuracy(output_transform=lambda o: (
                (_stack(o, "pred") > 0).long().view(-1), _stack(o, "label").long().view(-1))),
            "val_loss": ignite.metrics.Loss(loss_fn, output_transform=lambda o: (
                _stack(o, "pred").float(), _stack(o, "label").float())),
        }
    else:
        key, higher = "val_mse", False

        def pairs(o):
            return _stack(o, "pred").float(), _stack(o, "label").float()

        key_metric = {"val_mse": MeanSquaredError(output_transform=pairs)}
        def column(k: int):
            return lambda o: tuple(t[:, k : k + 1] for t in pairs(o))

        extra = {f"val_mse_{name}": MeanSquaredError(output_transform=column(k))
                 for k, name in enumerate(data.output_names)}
        extra["val_loss"] = ignite.metrics.Loss(loss_fn, output_transform=pairs)
    keeper = FoldKeeper(config, out, key, higher, process, model_meta)
    evaluator = SupervisedEvaluator(
        device=process.device, val_data_loader=val_loader, network=network, key_val_metric=key_metric,
        additional_metrics=extra, amp=False, inferer=AutocastInferer(precision), decollate=False,
        prepare_batch=prepare_batch, non_blocking=pin,
        metric_cmp_fn=(lambda current, prev: current > prev) if higher else (lambda current, prev: current < prev),
    )
    train_handlers = []
    if scheduler is not None:
        train_handlers.append(LrScheduleHandler(scheduler, print_lr=False, epoch_level=per_epoch))
    train_handlers.append(ValidationHandler(interval=1, validator=evaluator, epoch_level=True))
    trainer = SupervisedTrainer(
        device=process.device, max_epochs=config.epochs, train_data_loader=train_loader, network=network,
        optimizer=optimizer, loss_function=loss_fn, train_handlers=train_handlers, amp=False, decollate=False,
        prepare_batch=prepare_batch, non_blocking=pin, iteration_update=train_step.iteration,
        epoch_length=min(len(train_loader), config.max_train_batches or len(train_loader)),
    )
    from ignite.engine import Events

    @trainer.on(Events.EPOCH_STARTED)
    def _seed_epoch(engine) -> None:  # augmentations and dropout keyed to (seed, epoch)
        seed = epoch_seed(config.seed, engine.state.epoch)
        torch.manual_seed(seed)
        set_rnd(data.train, seed)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record_loss(engine) -> None:  # no host sync per iteration: the mean is read once per epoch
        keeper.epoch_losses.append(engine.state.output["loss"].detach())

    # after ValidationHandler (attached first, so it runs first at EPOCH_COMPLETED)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: keeper.validated(engine, evaluator, model))
    state_file = out / "state.pt"

    @trainer.on(Events.EPOCH_COMPLETED)
    def _save_state(engine) -> None:
        if process.main:
            state = {"format": "lidc-cdam-train-state", "fingerprint": config.fingerprint(),
                     "network": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else {},
                     "trainer": dict(engine.state_dict()), "keeper": keeper.state_dict(),
                     "precision": precision.name, "scaler": precision.state_dict()}
            save_torch(state_file, state)
            _write_history(out, keeper.history)
        if stop_after_epochs is not None and engine.state.epoch >= stop_after_epochs:
            engine.terminate()

    if progress and process.main:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False, desc=f"fold {data.fold}").attach(trainer, output_transform=lambda o: {
            "loss": float(o["loss"].detach())})

    resumed_from = 0
    if state_file.exists():
        resumed_from = _resume(state_file, config, model, optimizer, scheduler, trainer, keeper, precision)
    start = time.perf_counter()
    if resumed_from < config.epochs and keeper.stale < (config.early_stopping or math.inf):
        trainer.run()
    seconds = time.perf_counter() - start
    interrupted = stop_after_epochs is not None and trainer.state.epoch < config.epochs and not (
        config.early_stopping and keeper.stale >= config.early_stopping)
    result = {"fold": data.fold, "key_metric": key, "best": keeper.best, "best_epoch": keeper.best_epoch,
              "epochs_run": len(keeper.history), "resumed_from_epoch": resumed_from, "seconds": seconds,
              "seconds_per_epoch": seconds / max(1, len(keeper.history) - resumed_from),
              "best_metrics": next((h for h in keeper.history if h["epoch"] == keeper.best_epoch), {}),
              "checkpoint": str(out / "best.pt"), "interrupted": interrupted,
              "train_size": len(data.train), "val_size": len(data.val)}
    if process.main and not interrupted:
        result["trust"] = add_trust(out / "best.pt", data.trust if data.trust is not None else data.train,
                                    config.batch_size, process.device, crops=data.trust_crops)
        if data.test is not None:
            best = ViTModel.from_checkpoint(out / "best.pt").to(process.device)
            result["test_metrics"], predictions = evaluate_model(best, data.test, config, process.device)
            atomic_write(out / "test_predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
            if data.test_variants is not None and config.task == "biomarkers":
                metrics, _ = evaluate_model(best, data.test_variants, config, process.device)
                result["test_metrics"].update({f"variants_{k}": v for k, v in metrics.items() if k.startswith("r2")})
        write_json(out / "result.json", result)
    return result


def add_trust(path: Path, dataset: Dataset, batch_size: int, device: torch.device,
              crops: list[str] | None = None) -> dict[str, Any] | None:
    """Re-save the best checkpoint with the trust statistics of the best model on its training data:
    ``meta["trust"]`` (version 3, :mod:`lidc_cdam.models.domain_trust`: features of the block before the last,
    from the training ``crops`` when given, else from ``dataset``'s images) and ``meta["trust_latent"]``
    (version 1, :func:`lidc_cdam.models.trust.fit_trust` of the latents of ``dataset``, the training inputs
    without augmentation; kept for comparison). A summary for ``result.json``, or None (with a warning) when
    there are fewer than 2 training crops."""
    from lidc_cdam.models import domain_trust
    from lidc_cdam.models.trust import dataset_latents, fit_trust

    model = ViTModel.from_checkpoint(path).to(device)
    if len(dataset) < 2:
        log.warning("%s: fewer than 2 training crops: no trust statistics", path)
        return None
    start = time.perf_counter()
    if crops:
        from lidc_cdam.data.lidc.crops import read_crop

        stats = domain_trust.fit_from_crops(model, (read_crop(c)["image"] for c in crops),
                                            model.meta["input_stats"], batch_size=batch_size)
    else:
        from torch.utils.data import DataLoader

        images = torch.cat([b["image"] for b in DataLoader(dataset, batch_size=batch_size, shuffle=False)])
        stats = domain_trust.fit_from_images(model, images, batch_size)
    stats["seconds"] = round(time.perf_counter() - start, 2)
    latent = fit_trust(dataset_latents(model, dataset, batch_size))
    save_checkpoint(model.cpu(), path, meta={"trust": stats, "trust_latent": latent})
    return {"version": stats["version"], "n_train": stats["n_train"], "n_vectors": stats["n_vectors"],
            "dim": stats["dim"], "shrinkage": stats["shrinkage"], "cross_fit": stats["cross_fit"],
            "threshold": stats["threshold"], "seconds": stats["seconds"],
            "threshold_score": float(np.percentile(stats["train_distances"].cpu().numpy(), stats["threshold"]))}


@torch.no_grad()
def predict(model: ViTModel, dataset: Dataset, batch_size: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Outputs, labels and ids (``nodule_id`` when the items carry one) over a dataset."""
    from monai.data import DataLoader

    model.eval()
    outputs, labels, ids = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        image, target = prepare_batch(batch, device)
        outputs.append(model(image).float().cpu())
        labels.append(target.cpu())
        ids.extend(batch.get("nodule_id", [None] * len(image)))
    return torch.cat(outputs), torch.cat(labels), ids


def task_metrics(outputs: torch.Tensor, labels: torch.Tensor, task: str, names: list[str]) -> dict[str, float]:
    """Accuracy and AUC (malignancy) or MSE overall and per output (biomarkers, standardised units)."""
    if task == "malignancy":
        from sklearn.metrics import roc_auc_score

        y, logit = labels.view(-1).cpu().numpy(), outputs.view(-1).cpu().numpy()
        auc = float(roc_auc_score(y, logit)) if len(set(y.tolist())) == 2 else math.nan
        return {"accuracy": float(((logit > 0) == (y > 0.5)).mean()), "auc": auc}
    per = ((outputs - labels) ** 2).mean(0)
    return {"mse": float(per.mean()), **{f"mse_{n}": float(v) for n, v in zip(names, per, strict=True)},
            **r_squared(per, labels.var(0, unbiased=False), names)}


def r_squared(mse: Any, variance: Any, names: list[str]) -> dict[str, float]:
    """Held-out R^2 per output, ``1 - MSE / variance`` (the variance of the held-out targets themselves, so
    predicting their own mean scores 0), and ``r2`` their mean; NaN where the targets are constant."""
    mse, variance = np.asarray(mse, dtype=float), np.asarray(variance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(variance > 0, 1.0 - mse / variance, np.nan)
    return {"r2": float(np.nanmean(r2)) if np.isfinite(r2).any() else math.nan,
            **{f"r2_{n}": float(v) for n, v in zip(names, r2, strict=True)}}


def evaluate_model(model: ViTModel, dataset: Dataset, config: TrainConfig, device: torch.device):
    """Metrics of a trained model on a dataset and its per-item predictions."""
    import pandas as pd

    outputs, labels, ids = predict(model, dataset, config.batch_size, device)
    names = list(model.output_names or [])
    frame = pd.DataFrame({"nodule_id": ids})
    for k, name in enumerate(names):
        frame[f"true_{name}"] = labels[:, k].cpu().numpy()
        frame[f"pred_{name}"] = outputs[:, k].cpu().numpy()
    return task_metrics(outputs, labels, config.task, names), frame


def _resume(state_file: Path, config: TrainConfig, model: ViTModel, optimizer, scheduler, trainer,
            keeper: FoldKeeper, precision: Precision) -> int:
    state = read_checkpoint(state_file)  # weights_only=True
    if state.get("fingerprint") != config.fingerprint():
        raise ValueError(f"{state_file}: a training state of another config; use another --out or --restart")
    model.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    trainer.load_state_dict(state["trainer"])
    keeper.load_state_dict(state["keeper"])
    precision.load_state_dict(state.get("scaler", {}))  # fp16: the gradient scaler's scale and growth tracker
    epoch = int(state["trainer"]["iteration"]) // int(state["trainer"]["epoch_length"])
    log.info("resuming %s from epoch %d", state_file.parent, epoch)
    return epoch


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    import pandas as pd

    frame = pd.DataFrame(history)
    for column in list(frame.columns):
        if frame[column].map(lambda v: isinstance(v, list)).any():
            expanded = pd.DataFrame(frame.pop(column).tolist(), index=frame.index).add_prefix(f"{column}_")
            frame = frame.join(expanded)
    atomic_write(out / "history.csv", lambda tmp: frame.to_csv(tmp, index=False))
