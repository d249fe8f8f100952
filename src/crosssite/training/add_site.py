"""Add a hospital to a trained model: a new site slot, estimated on its slices and, with labels, fine-tuned.

    new_model, card, report = add_site(model, card, "hospital_c", images=slices)                 # AdaBN only
    new_model, card, report = add_site(model, card, "hospital_c", labelled=site, known=[site_a])  # + labels

Without labels the new slot of every site-specific module (`crosssite.models.SiteModule`) is added by AdaBN
(`crosssite.models.adapt_norm`: affine parameters = the mean of the known sites', statistics re-estimated on the
new site's slices). With labels (10-100 slices are enough to start), the slot's statistics are estimated on the
site's slices (all of them, labelled or not, where given; else the labelled ones), then its parameters -- and nothing else, unless ``train_head`` -- are fine-tuned on a training
part of the labels with cross-entropy plus, for a model with a projection head, the paper's supervised
contrastive loss over batches that mix the new site's slices with slices of the known sites (``known``, through
their own, frozen slots), which pulls the new site's embeddings toward the known sites' classes. Batch norm
stays in evaluation mode: the known sites' slots, statistics included, are never touched, so their predictions
are bit-for-bit those of the original model (``train_head`` trains the shared head and changes them; the report
says so). Training is a fixed budget of optimiser steps (300 of 16 slices, learning rate 1e-2 for the slot's
few parameters), so a small labelled set gets as many updates as a large one; early stopping reads the AUC on a
validation part carved from the labels (by patient where the site has patient ids; at least 20 slices, else
every labelled slice trains and the last weights are kept) every 25 steps, the best weights are kept, and 4
validations without a gain stop the run.

`finetune_baseline` gives the learning curve's two references on the same labelled part: fine-tuning every weight
of the model (``"all"``), and training the same architecture from scratch (``"scratch"``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from torch import Tensor, nn

from crosssite import models
from crosssite.data import Site, card_tta, read_image, tta_average
from crosssite.errors import ConfigError, ImageReadError, SiteError, TrainingDiverged
from crosssite.losses import supervised_contrastive_loss
from crosssite.models import SiteModule
from crosssite.models.adaptation import MIN_ADAPT_IMAGES

__all__ = ["AddSiteReport", "LabelledSlices", "slot_parameters", "decode_site", "split_labelled", "add_site",
           "finetune_baseline", "site_auc"]


@dataclass
class LabelledSlices:
    """Decoded model inputs of one site: images (N, 3, S, S), labels (N,), patient of each slice (or None)."""

    images: Tensor
    labels: Tensor
    patients: list[str | None]
    skipped: list[str] = field(default_factory=list)  # "path: why" of every slice that could not be read

    def subset(self, index: Sequence[int] | np.ndarray) -> LabelledSlices:
        index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return LabelledSlices(self.images[index], self.labels[index], [self.patients[i] for i in index.tolist()])

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class AddSiteReport:
    """What `add_site` did, as written into the model card's ``added_sites``."""

    name: str
    site_index: int
    mode: str  # "adabn" (no labels) or "finetune"
    images: int  # slices the slot's statistics were estimated on
    skipped: int = 0
    train: int = 0
    val: int = 0
    grouped_by: str = "slices"  # "patients" when the validation part was carved by patient
    tuned_parameters: int = 0
    train_head: bool = False
    steps: int = 0  # optimiser steps run (early stopping may end before the budget)
    best_step: int = 0  # the step of the kept weights (0: the AdaBN slot itself)
    val_auc: float | None = None  # of the kept weights; None without a validation part with both classes
    val_auc_adabn: float | None = None  # of the AdaBN slot before fine-tuning, on the same validation part
    known_sites_unchanged: bool = True
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- data


def decode_site(site: Site, preprocess: Callable[[np.ndarray], Tensor]) -> LabelledSlices:
    """Every sample of ``site`` read and preprocessed as the model card says; unreadable files are listed in
    ``skipped`` (never silently dropped); a site with no readable slice is a `SiteError`."""
    images, labels, patients, skipped = [], [], [], []
    for sample in site.samples:
        try:
            images.append(preprocess(read_image(sample.path, sample.frame)))
        except ImageReadError as e:
            skipped.append(str(e))
            continue
        labels.append(sample.label)
        patients.append(sample.patient)
    if not images:
        raise SiteError(f"site {site.name!r} ({site.root}): none of its {len(site.samples)} slices could be read")
    return LabelledSlices(torch.stack(images), torch.tensor(labels, dtype=torch.long), patients, skipped)


# Fewer validation slices than this would make early stopping follow noise (a handful of slices ranks the
# untrained slot as often as the trained one): then every labelled slice trains and the last weights are kept.
MIN_VALIDATION_SLICES = 20


def split_labelled(data: LabelledSlices, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Train / validation indices of the labelled slices, stratified by class and grouped by patient when every
    slice has one; no validation part (empty) when a class has fewer than 2 slices or groups, or the part would
    hold fewer than `MIN_VALIDATION_SLICES` slices."""
    labels = data.labels.numpy()
    n_splits = max(2, int(round(1 / val_fraction)))
    grouped = all(p is not None for p in data.patients)
    groups = np.array(data.patients if grouped else [str(i) for i in range(len(labels))])
    per_class = [len(set(groups[labels == c])) for c in (0, 1)]
    if min(per_class) < 2:
        return np.arange(len(labels)), np.array([], dtype=np.int64), "none"
    n_splits = min(n_splits, min(per_class))
    if grouped:
        folds = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(labels, labels, groups)
    else:
        folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(labels, labels)
    train, val = next(folds)
    if len(val) < MIN_VALIDATION_SLICES:
        return np.arange(len(labels)), np.array([], dtype=np.int64), "none"
    return train, val, "patients" if grouped else "slices"


# ----------------------------------------------------------------------------------------------- slots


def slot_parameters(model: nn.Module, index: int) -> list[nn.Parameter]:
    """The parameters of site slot ``index`` in every `SiteModule` of ``model`` (BN copies, adapters, heads)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, SiteModule):
            continue
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.ParameterList)) and len(child) == module.num_sites:
                slot = child[index]
                params.extend([slot] if isinstance(slot, nn.Parameter) else slot.parameters())
    return params


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and shifts of up to 1/16 of the side (reflect-padded), on a batch of inputs."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    pad = max(1, h // 16)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.inference_mode()
def site_probabilities(model: nn.Module, images: Tensor, site: int | None, batch_size: int = 128,
                       tta: str = "none") -> np.ndarray:
    """P(COVID) of ``images`` through slot ``site`` (None: a single-site model's only norm), with test-time
    augmentation ``tta`` (`crosssite.data.tta_average`: the model card's)."""
    model.eval()
    out = []
    for chunk in images.split(batch_size):
        sites = None if site is None else torch.full((len(chunk),), site, dtype=torch.long)
        out.append(tta_average(lambda x: torch.softmax(model(x, sites).logits.float(), 1)[:, 1], chunk, tta))
    return torch.cat(out).numpy().astype(np.float64)


def site_auc(model: nn.Module, data: LabelledSlices, site: int | None, tta: str = "none") -> float | None:
    """AUC of slot ``site`` on ``data`` (None when ``data`` lacks a class)."""
    if len(data) == 0 or len(set(data.labels.tolist())) < 2:
        return None
    return float(roc_auc_score(data.labels.numpy(), site_probabilities(model, data.images, site, tta=tta)))


# -------------------------------------------------------------------------------------------- training


def _fit(model: nn.Module, params: list[nn.Parameter], train: LabelledSlices, val: LabelledSlices, site: int | None,
         *, known: list[tuple[LabelledSlices, int]], steps: int, lr: float, batch_size: int, alpha: float,
         tau: float, patience: int, seed: int, eval_every: int = 25, bn_train: bool = False, tta: str = "none"
         ) -> tuple[int, int, float | None]:
    """Adam on ``params`` only, ``steps`` steps of ``batch_size`` slices (reshuffled passes over ``train``, so a
    10-slice set gets as many updates as a 300-slice one); validation every ``eval_every`` steps, stopping after
    ``patience`` validations without a gain. Returns (steps run, best step, best validation AUC); the best
    weights are kept (without a validation part: the last). Batch norm stays in evaluation mode unless
    ``bn_train`` (training from scratch). Validation predicts with test-time augmentation ``tta``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    best_auc, best_step, best_state = site_auc(model, val, site, tta), 0, copy.deepcopy(model.state_dict())
    best_score = -math.inf if best_auc is None else best_auc
    order, cursor, step = torch.randperm(len(train), generator=generator), 0, 0
    for step in range(1, steps + 1):
        model.train(bn_train)
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        loss = _loss(model, train.images[idx], train.labels[idx], site, known, len(idx), alpha, tau, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not bool(torch.isfinite(loss)) or any(not bool(torch.isfinite(p).all()) for p in params):
            # stop at once: validating NaN probabilities would fail deep in scikit-learn
            raise TrainingDiverged(f"fine-tuning diverged at step {step} (the loss or a tuned weight became NaN or "
                                   f"infinite at learning rate {lr:g}); no model written: try a lower --lr")
        if step % eval_every and step != steps:
            continue
        auc = site_auc(model, val, site, tta)
        score = step if auc is None else auc  # no validation part: the last weights are kept
        if score > best_score:
            best_score, best_auc, best_step, best_state = score, auc, step, copy.deepcopy(model.state_dict())
        elif auc is not None and (step - best_step) >= patience * eval_every:
            break
    model.load_state_dict(best_state)
    model.eval()
    return step, best_step, best_auc


def _loss(model: nn.Module, images: Tensor, labels: Tensor, site: int | None, known: list[tuple[LabelledSlices, int]],
          n: int, alpha: float, tau: float, generator: torch.Generator) -> Tensor:
    """Cross-entropy on the new site's batch, plus the contrastive term over it and as many known-site slices."""
    batches, sites, targets = [_augment(images, generator)], [_site_tensor(site, n)], [labels]
    for data, index in known:
        pick = torch.randint(0, len(data), (max(1, n // len(known)),), generator=generator)
        batches.append(_augment(data.images[pick], generator))
        sites.append(_site_tensor(index, len(pick)))
        targets.append(data.labels[pick])
    x, y = torch.cat(batches), torch.cat(targets)
    site_arg = None if site is None else torch.cat(sites)
    out = model(x, site_arg)
    loss = F.cross_entropy(out.logits[:n].float(), labels)
    if alpha > 0 and out.projection is not None and len(set(y.tolist())) > 1:
        loss = loss + alpha * supervised_contrastive_loss(out.projection.float(), y, tau)
    return loss


def _site_tensor(site: int | None, n: int) -> Tensor:
    return torch.full((n,), 0 if site is None else site, dtype=torch.long)


def _check_model(model: nn.Module, card: dict[str, Any], name: str) -> list[str]:
    if not any(isinstance(m, SiteModule) for m in model.modules()):
        raise ConfigError("add-site needs a model with site-specific layers (SepNorm, adapters, MS-Net); "
                          f"this one ({card.get('method', card.get('architecture'))}) shares every layer")
    names = list(card.get("site_names") or [f"site{i}" for i in range(model.num_sites)])
    if name in names:
        raise ConfigError(f"site {name!r} is already known to the model (its sites: {', '.join(names)})")
    return names


def add_site(
    model: nn.Module,
    card: dict[str, Any],
    name: str,
    *,
    images: Tensor | None = None,
    labelled: LabelledSlices | None = None,
    known: Sequence[tuple[LabelledSlices, str]] = (),
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 16,
    train_head: bool = False,
    alpha: float = 1.0,
    tau: float = 0.05,
    val_fraction: float = 0.25,
    patience: int = 4,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any], AddSiteReport]:
    """A copy of ``model`` with a slot for site ``name`` and its updated card (see the module docstring).

    Args:
        images: the new site's model inputs (N, 3, S, S), labels unused: the slot's statistics are estimated on
            them (AdaBN); without them, on the labelled slices.
        labelled: its labelled slices (`decode_site`): with them, the slot is then fine-tuned.
        known: labelled slices of known sites, by site name, mixed into the contrastive batches.
    """
    names = _check_model(model, card, name)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learning rate (--lr) must be a positive finite number, got {lr}")
    if images is None and labelled is None:
        raise ConfigError("add_site needs the new site's slices: unlabelled images, labelled slices, or both")
    model = copy.deepcopy(model).float().eval()
    source = images if images is not None else labelled.images
    if len(source) < MIN_ADAPT_IMAGES:
        raise ConfigError(f"site {name!r}: its slot's statistics need at least {MIN_ADAPT_IMAGES} readable slices, "
                          f"got {len(source)}")
    index = models.adapt_norm(model, source)
    report = AddSiteReport(name=name, site_index=index, mode="adabn", images=len(source),
                           skipped=len(labelled.skipped) if labelled is not None else 0)
    if labelled is not None:
        _finetune(model, labelled, report, known, names, steps=steps, lr=lr, batch_size=batch_size,
                  train_head=train_head, alpha=alpha, tau=tau, val_fraction=val_fraction, patience=patience, seed=seed,
                  tta=card_tta(card))
    for p in model.parameters():
        p.requires_grad_(True)
    new_card = dict(card, site_names=names + [name])
    new_card["added_sites"] = list(card.get("added_sites") or []) + [report.to_dict()]
    return model, new_card, report


def _finetune(model: nn.Module, labelled: LabelledSlices, report: AddSiteReport,
              known: Sequence[tuple[LabelledSlices, str]], names: list[str], *, train_head: bool, val_fraction: float,
              seed: int, **fit: Any) -> None:
    train_idx, val_idx, grouped = split_labelled(labelled, val_fraction, seed)
    train, val = labelled.subset(train_idx), labelled.subset(val_idx)
    params = slot_parameters(model, report.site_index)
    if train_head:
        params += list(model.get_classifier().parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    unknown = [site for _, site in known if site not in names]
    if unknown:
        raise ConfigError(f"known site(s) {', '.join(unknown)} are not sites of the model ({', '.join(names)})")
    report.val_auc_adabn = site_auc(model, val, report.site_index, fit["tta"])
    done, best, auc = _fit(model, params, train, val, report.site_index,
                           known=[(data, names.index(site)) for data, site in known], seed=seed, **fit)
    report.mode, report.train, report.val, report.grouped_by = "finetune", len(train), len(val), grouped
    report.tuned_parameters = sum(p.numel() for p in params)
    report.train_head, report.known_sites_unchanged = train_head, not train_head
    report.steps, report.best_step, report.val_auc = done, best, auc


def finetune_baseline(
    model: nn.Module, card: dict[str, Any], labelled: LabelledSlices, kind: str, *, images: Tensor | None = None,
    steps: int = 300, lr: float = 1e-4, batch_size: int = 16, val_fraction: float = 0.25, patience: int = 4,
    seed: int = 0,
) -> tuple[nn.Module, int | None]:
    """A reference for the learning curve, on the same labelled part as `add_site`: ``"all"`` fine-tunes every
    weight of (a copy of) ``model`` after AdaBN; ``"scratch"`` trains the card's architecture with one shared BN
    from a fresh initialisation. Returns the model and the site index to evaluate with."""
    train_idx, val_idx, _ = split_labelled(labelled, val_fraction, seed)
    train, val = labelled.subset(train_idx), labelled.subset(val_idx)
    if kind == "all":
        model = copy.deepcopy(model).float().eval()
        site: int | None = models.adapt_norm(model, labelled.images if images is None else images)
        bn_train = False
    elif kind == "scratch":
        torch.manual_seed(seed)
        args = dict(card["model_args"], norm="batch")
        model = models.create_model(card["architecture"], num_sites=1, **args)
        site, bn_train, lr = None, True, max(lr, 1e-3)
    else:
        raise ConfigError(f"baseline kind must be 'all' or 'scratch', got {kind!r}")
    _fit(model, list(model.parameters()), train, val, site, known=[], steps=steps, lr=lr, batch_size=batch_size,
         alpha=0.0, tau=0.05, patience=patience, seed=seed, bn_train=bn_train, tta=card_tta(card))
    return model, site
