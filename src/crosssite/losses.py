"""Losses of the paper's joint learning: the supervised cross-site contrastive loss and MS-Net's knowledge transfer.

Contrastive loss (Wang, Liu, Dou 2020, Sec. III-C, Eq. 4). The projection head maps each image of a mixed-site
batch to a vector; vectors are L2-normalised and compared by cosine similarity ``s_mn`` scaled by a temperature
``tau`` (0.05). Every ordered pair ``(m, n)``, ``m != n``, of the same class is a positive pair, whether the two
images come from the same site or from different sites; every pair of different classes is a negative pair.
Each positive pair contributes

    -log( exp(s_mn / tau) / (exp(s_mn / tau) + sum_{k: y_k != y_m} exp(s_mk / tau)) )

and the loss is the mean over all ordered positive pairs. This is the form the authors' release computes
(NT-Xent style). Eq. 4 as printed leaves the positive term out of the denominator (``form="eq4"``); that variant
is unbounded below and is kept only to compare against.

Edge cases, both defined so that a batch never yields NaN:
- no positive pair (every class occurs once): the loss is 0, still attached to the graph;
- a positive pair whose anchor has no negative (a batch of one class): the NT-Xent term is -log(1) = 0;
  in the Eq. 4 form the term is undefined (log of 0 / 0 negatives) and is also taken as 0.

MS-Net knowledge transfer (Liu et al., "MS-Net: Multi-site network for improving prostate segmentation with
heterogeneous MRI data", IEEE TMI 2020): each sample's own-site auxiliary head is trained with cross-entropy,
and its softened prediction teaches the universal head through a temperature-``T`` KL divergence scaled by
``T**2`` (Hinton et al. 2015), with the auxiliary head detached so that it acts as a teacher only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["supervised_contrastive_loss", "knowledge_transfer_loss", "ms_net_loss"]


def supervised_contrastive_loss(
    projection: Tensor,
    labels: Tensor,
    tau: float = 0.05,
    form: str = "ntxent",
) -> Tensor:
    """Supervised cross-site contrastive loss of a batch of projections.

    Args:
        projection: (B, D) projected features of a mixed-site batch (normalised here).
        labels: (B,) integer class labels.
        tau: temperature of the cosine similarities.
        form: ``"ntxent"`` (positive in the denominator, as released) or ``"eq4"`` (negatives only, as printed).

    Returns:
        Scalar loss in float32 (or the input's dtype if wider), 0 when the batch has no positive pair.
    """
    if projection.dim() != 2 or labels.shape != projection.shape[:1]:
        raise ValueError(
            f"projection must be (B, D) and labels (B,); got {tuple(projection.shape)} and {tuple(labels.shape)}"
        )
    if form not in ("ntxent", "eq4"):
        raise ValueError(f"form must be 'ntxent' or 'eq4', got {form!r}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")

    z = F.normalize(projection.float() if projection.dtype != torch.float64 else projection, dim=1)
    sim = z @ z.T / tau  # (B, B) scaled cosine similarities
    same = labels[:, None] == labels[None, :]  # (B, B)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    if not bool(positive.any()):
        return sim.sum() * 0.0

    # log sum_{k negative of m} exp(s_mk), one value per anchor m; the fill is finite so that rows without any
    # negative have a finite, gradient-free value (masked_fill passes no gradient to filled entries).
    fill = torch.finfo(sim.dtype).min
    neg_lse = torch.logsumexp(sim.masked_fill(~negative, fill), dim=1)  # (B,)
    has_negative = negative.any(dim=1)
    if form == "ntxent":
        neg_lse = torch.where(has_negative, neg_lse, torch.full_like(neg_lse, float("-inf")))
        pair_loss = torch.logaddexp(sim, neg_lse[:, None]) - sim  # (B, B); exactly 0 where m has no negative
    else:
        pair_loss = torch.where(has_negative[:, None], neg_lse[:, None] - sim, torch.zeros_like(sim))
    return pair_loss[positive].mean()


def knowledge_transfer_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch; the teacher is detached."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * (t * t)


def ms_net_loss(
    logits: Tensor,
    aux_logits: Tensor,
    labels: Tensor,
    temperature: float = 2.0,
) -> dict[str, Tensor]:
    """MS-Net's extra terms: cross-entropy of the own-site auxiliary heads and their transfer into the universal head.

    Returns the two unweighted terms, ``aux_ce`` and ``kt``; the training loop adds ``aux_ce + kt_weight * kt``.
    The universal head's own cross-entropy is left to the caller, as for every other method.
    """
    aux_ce = F.cross_entropy(aux_logits.float(), labels)
    kt = knowledge_transfer_loss(logits, aux_logits, temperature)
    return {"aux_ce": aux_ce, "kt": kt}
