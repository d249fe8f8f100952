"""What every backbone ends with, so that a backbone is only its trunk: the pooled embedding's heads and the
`SiteClassifier` base class that owns them.

A backbone subclasses `SiteClassifier`, builds its trunk (``forward_features(x, site) -> (B, C, h, w)``) and a
``pool`` (feature map -> (B, D) embedding), then calls `SiteClassifier.build_heads` once; the base class gives it
the heads a method asks for and everything the rest of the package calls on a model:

* ``head``: the universal classifier, an `MLPHead` (hidden Linear+norm+ReLU layers, then ``head.fc``);
* ``projector``: the contrastive projection head (``projection=True``): Linear+norm+ReLU, then a linear layer
  (SimCLR's form: a final norm+ReLU would confine every projection to the positive orthant of the unit sphere);
* ``aux_heads``: MS-Net's auxiliary heads, one `MLPHead` per site (`SiteHeads`, ``aux_heads=True``), with the
  universal head's architecture (Liu, Dou, Yu, Heng, IEEE TMI 2020);
* ``forward`` -> `ModelOutput`, ``forward_head``, ``get_classifier``, ``reset_classifier`` and the check of the
  ``site`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from crosssite.models.norms import BatchNorm, NoNorm, NormLayer, SiteLayout, SiteModule, Sites, per_site

__all__ = ["ModelOutput", "channels", "LinearNormAct", "MLPHead", "SiteHeads", "SiteClassifier"]


class ModelOutput(NamedTuple):
    """What a forward pass returns. Shapes for a batch of B images."""

    logits: Tensor  # (B, num_classes) raw logits of the universal head
    embedding: Tensor  # (B, D) pooled embedding the heads read (8192-d for the redesign at width 1)
    projection: Tensor | None  # (B, proj_dim) projection-head output, None without a projection head
    aux_logits: Tensor | None  # (B, num_classes) each sample's own site's auxiliary head, None without


def channels(c: int, width: float) -> int:
    """``c`` scaled by ``width``, rounded to a multiple of 8, at least 8 (every backbone scales its widths so)."""
    return max(8, int(round(c * width / 8)) * 8)


class LinearNormAct(nn.Module):
    """Linear, norm (B, C), ReLU."""

    def __init__(self, in_features: int, out_features: int, *, norm_layer: NormLayer) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.norm = norm_layer(out_features)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, site: Sites) -> Tensor:
        return self.act(self.norm(self.fc(x), site))


class MLPHead(nn.Module):
    """Hidden layers Linear+norm+ReLU, then a final Linear. (B, in_features) -> (B, out_features)."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, *, norm_layer: NormLayer) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        self.hidden = nn.ModuleList(LinearNormAct(a, b, norm_layer=norm_layer) for a, b in zip(sizes, sizes[1:]))
        self.fc = nn.Linear(sizes[-1], out_features)

    def forward(self, x: Tensor, site: Sites) -> Tensor:
        for layer in self.hidden:
            x = layer(x, site)
        return self.fc(x)


class SiteHeads(SiteModule):
    """MS-Net auxiliary heads: one `MLPHead` per site; each sample goes through its own site's head. Being per site
    already, their norms are shared batch norm (or none for a backbone without norms)."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], out_features: int, num_sites: int, *, norm: bool
    ) -> None:
        super().__init__()
        self.head_args = (in_features, tuple(hidden), out_features)
        self.norm_layer: NormLayer = BatchNorm if norm else NoNorm
        self.heads = nn.ModuleList(MLPHead(*self.head_args, norm_layer=self.norm_layer) for _ in range(num_sites))

    @property
    def num_sites(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor, site: Sites) -> Tensor:
        if site is None:  # an unknown site: the mean of every auxiliary head's logits
            return torch.stack([head(x, None) for head in self.heads]).mean(0)
        return per_site(x, site, lambda xs, s: self.heads[s](xs, None))

    @torch.no_grad()
    def add_site(self) -> None:
        """Append a head whose parameters and statistics are the mean of the known sites' heads."""
        head = MLPHead(*self.head_args, norm_layer=self.norm_layer).to(next(self.heads[0].parameters()))
        states = [h.state_dict() for h in self.heads]
        head.load_state_dict(
            {k: torch.stack([s[k] for s in states]).float().mean(0).to(v.dtype) for k, v in states[0].items()}
        )
        self.heads.append(head)


class SiteClassifier(nn.Module):
    """Base class of every backbone: a trunk (the subclass's ``forward_features`` and ``pool``) and the shared heads.

    ``forward(x, site)``: ``x`` (B, 3, H, W), ``site`` (B,) long site indices or a `SiteLayout` (the same as Python
    ints, for a batch in per-site runs: no host sync), or None (a single-site model, or, in evaluation, an unknown
    site normalised with the mean of the sites' statistics). Subclasses set ``model_kwargs`` (the keyword arguments
    that rebuild them, for the model card) and call `build_heads` after building their trunk.
    """

    num_sites: int
    num_classes: int
    model_kwargs: dict[str, Any]
    pool: nn.Module

    def build_heads(
        self, embed_dim: int, *, num_classes: int, num_sites: int, hidden: Sequence[int], norm: str,
        norm_layer: NormLayer, projection: tuple[int, int] | None = None, aux_heads: bool = False,
    ) -> None:
        """The universal head (``hidden`` sizes, then ``num_classes`` logits), the projection head (``projection``:
        its hidden size and output size, or None) and MS-Net's per-site auxiliary heads (``aux_heads``)."""
        self.num_sites, self.num_classes, self.embed_dim = num_sites, num_classes, embed_dim
        self.head = MLPHead(embed_dim, hidden, num_classes, norm_layer=norm_layer)
        self.projector = MLPHead(embed_dim, [projection[0]], projection[1], norm_layer=norm_layer) \
            if projection else None
        self.aux_heads = SiteHeads(embed_dim, hidden, num_classes, num_sites, norm=norm != "none") \
            if aux_heads else None

    def classifier_heads(self) -> list[MLPHead]:
        """The universal head and every auxiliary head: the heads that output class logits."""
        return [self.head, *(self.aux_heads.heads if self.aux_heads is not None else ())]

    def check_site(self, site: Sites, batch: int) -> Sites:
        """``site`` if it fits a batch of ``batch`` samples and this model's site slots, else a ValueError."""
        if site is None:
            return None
        if isinstance(site, SiteLayout):  # Python ints: checked without touching a tensor
            if site.batch_size != batch or not all(0 <= s < self.num_sites for s, _ in site.runs):
                raise ValueError(f"site layout {site.runs} does not fit a batch of {batch} over {self.num_sites} sites")
            return site
        if site.dtype != torch.long or site.shape != (batch,):
            raise ValueError(f"site must be a LongTensor of shape ({batch},), got {site.dtype} {tuple(site.shape)}")
        if batch and not (0 <= int(site.min()) and int(site.max()) < self.num_sites):
            raise ValueError(f"site indices must lie in [0, {self.num_sites}), got {site.tolist()}")
        return site

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new, zero-initialised last layer with ``num_classes`` outputs for the universal head and every
        auxiliary head (fine-tuning for another label set); the rest of the network is kept."""
        for head in self.classifier_heads():
            old = head.fc
            head.fc = nn.Linear(old.in_features, num_classes).to(old.weight)
            nn.init.zeros_(head.fc.weight)
            nn.init.zeros_(head.fc.bias)
        self.num_classes = num_classes
        self.model_kwargs["num_classes"] = num_classes
        if self.aux_heads is not None:
            self.aux_heads.head_args = (*self.aux_heads.head_args[:2], num_classes)

    def forward_features(self, x: Tensor, site: Sites = None) -> Tensor:
        """The trunk's last feature map (B, C, h, w)."""
        raise NotImplementedError

    def forward_head(self, x: Tensor, site: Sites = None, pre_logits: bool = False) -> Tensor:
        """Logits (B, num_classes) from a feature map, or the pooled embedding (B, D) if ``pre_logits``."""
        site = self.check_site(site, x.shape[0])
        x = self.pool(x)  # (B, D)
        return x if pre_logits else self.head(x, site)

    def forward(self, x: Tensor, site: Sites = None) -> ModelOutput:
        site = self.check_site(site, x.shape[0])
        embedding = self.forward_head(self.forward_features(x, site), site, pre_logits=True)  # (B, D)
        return ModelOutput(
            logits=self.head(embedding, site),
            embedding=embedding,
            projection=None if self.projector is None else self.projector(embedding, site),
            aux_logits=None if self.aux_heads is None else self.aux_heads(embedding, site),
        )
