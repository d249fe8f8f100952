"""COVID-Net, original and redesigned, for any number of sites: the trunk (its heads are the shared ones of
`crosssite.models.heads`).

* COVID-Net: Wang, Lin, Wong, "COVID-Net: a tailored deep convolutional neural network design for
  detection of COVID-19 cases from chest X-ray images", Scientific Reports 2020 -- PEPX blocks
  (projection, expansion, depthwise representation, projection, extension) with dense connections.
* Redesign, SepNorm and contrastive projection head: Wang, Liu, Dou, "Contrastive Cross-site Learning with
  Redesigned Net for COVID-19 CT Classification", IEEE JBHI 2020 (section III-A, III-B).
* Site-specific adapters (Rebuffi et al. 2017, 2018): `crosssite.models.adapters`.
* MS-Net auxiliary heads: Liu, Dou, Yu, Heng, "MS-Net: Multi-Site Network for Improving Prostate
  Segmentation with Heterogeneous MRI Data", IEEE TMI 2020 -- one auxiliary head per site beside the
  universal head; the training loss adds cross-entropy on the auxiliary heads and distils their softened
  predictions into the universal head.

Topology (width 1, 224 px; ``../shared/SPEC.md`` is the reference):

    stem       7x7/2 conv 3 -> 64 [+ norm] + ReLU, max-pool 2            224 -> 112 -> 56
    stage s    (56, 3, 256), (28, 4, 512), (14, 6, 1024), (7, 3, 2048)   (resolution, blocks, channels)
    shortcut   upper branch: 1x1 conv [+ norm] + ReLU of the stage input, max-pooled for stages 2-4
    blocks     lower branch: block k's input = shortcut + outputs of blocks 1..k-1 (block 1: the stage
               input, max-pooled for stages 2-4); the stage input of stage s+1 is shortcut + all of stage
               s's block outputs, each used exactly once (kept as a running sum)
    head       redesign: adaptive average pool 2x2 -> 8192-d embedding -> [Linear+BN1d+ReLU] 1024, 256
               -> num_classes (raw logits); original: flatten 7x7x2048 -> Linear+ReLU 1024, 256 -> logits

Choices this file makes (documented, not in the paper):
* ``block_act="relu"`` puts a ReLU after each of the first four convolutions of a PEPX block; the block's
  output (it is summed into the dense connections) is never activated. ``"none"`` is the authors' release.
* ``width`` scales every channel count and head size (the projection's 128 included), rounded to a
  multiple of 8 and at least 8, which keeps the PEPX widths C/2 and 3C/4 integral; the class count is
  never scaled.
* ``norm`` places its layers where the redesign has BN (stem, shortcuts, hidden head layers); the original
  COVID-Net defaults to ``norm="none"`` and keeps the ReLUs there, the redesign to ``norm="batch"``.
* The original COVID-Net's flatten size follows the feature map of ``image_size`` (224 -> 7x7).
* The projection head is Linear+norm+ReLU (8192 -> 1024) then Linear (1024 -> 128): the release ends with
  a second BN+ReLU, which would confine every projection to the positive orthant of the cosine
  similarity's unit sphere, so the final layer is linear as in SimCLR (`crosssite.models.heads`).
* The auxiliary heads have the universal head's architecture; being per site already, their BN is shared.
* ``init="fan_in"`` (the original COVID-Net's default): every convolution and linear weight drawn with
  variance 1 / fan-in (gain 1, no ReLU gain: the PEPX blocks are linear), biases zero, and the classifiers'
  last layers zero so training starts at P = 1/2. With PyTorch's defaults the normalisation-free network's
  logits barely vary across a batch (std ~2e-5 at 64 px, width 0.25) and it never learns; the ReLU gain
  overshoots (logit std ~1e11, the dense sums add block outputs up). ``"default"`` keeps PyTorch's
  initialisation (the redesign's default: its BN layers rescale every stage).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from crosssite.errors import ConfigError
from crosssite.models.adapters import AdapterLayer, get_adapter_layer
from crosssite.models.heads import SiteClassifier, channels
from crosssite.models.norms import NormLayer, Sites, get_norm_layer, standardise_images
from crosssite.models.registry import ModelConfig, model_config, register_model

__all__ = ["ConvNormAct", "PEPX", "DenseStage", "MixStyle", "CovidNet", "COVIDNET_OPTIONS"]

BLOCK_ACTS = ("none", "relu")
INITS = ("default", "fan_in")


class ConvNormAct(nn.Module):
    """Convolution, norm (shared, per site or none), ReLU. The stem and the upper-branch shortcuts."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, *, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2)
        self.norm = norm_layer(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, site: Sites) -> Tensor:
        return self.act(self.norm(self.conv(x), site))


class PEPX(nn.Module):
    """Projection-expansion-projection-extension block: 1x1, 1x1, depthwise 3x3, 1x1, 1x1 convs, all biased.

    Cin -> Cin/2 -> 3Cin/4 -> (3x3 depthwise) 3Cin/4 -> Cin/2 -> Cout, spatial size kept. The adapter (if
    any) wraps the depthwise conv.
    """

    def __init__(
        self, in_chs: int, out_chs: int, *, act_layer: type[nn.Module], adapter_layer: AdapterLayer
    ) -> None:
        super().__init__()
        half, three_quarters = in_chs // 2, 3 * in_chs // 4
        self.project = nn.Conv2d(in_chs, half, 1)
        self.expand = nn.Conv2d(half, three_quarters, 1)
        self.depthwise = nn.Conv2d(three_quarters, three_quarters, 3, padding=1, groups=three_quarters)
        self.adapter = adapter_layer(three_quarters)
        self.project2 = nn.Conv2d(three_quarters, half, 1)
        self.extend = nn.Conv2d(half, out_chs, 1)
        self.act = act_layer()

    def forward(self, x: Tensor, site: Sites) -> Tensor:
        x = self.act(self.project(x))  # (B, Cin/2, H, W)
        x = self.act(self.expand(x))  # (B, 3Cin/4, H, W)
        x = self.act(self.adapter(x, self.depthwise(x), site))  # (B, 3Cin/4, H, W)
        x = self.act(self.project2(x))  # (B, Cin/2, H, W)
        return self.extend(x)  # (B, Cout, H, W)


class DenseStage(nn.Module):
    """A stage of densely connected PEPX blocks plus its upper-branch shortcut.

    ``forward(x)`` takes the previous stage's total (shortcut + every block output; the pooled stem output
    for stage 1) and returns ``(total, last)``: this stage's total and its last block's output.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        *,
        downsample: bool,
        norm_layer: NormLayer,
        act_layer: type[nn.Module],
        adapter_layer: AdapterLayer,
    ) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.shortcut = ConvNormAct(in_chs, out_chs, 1, norm_layer=norm_layer)
        self.blocks = nn.ModuleList(
            PEPX(in_chs if i == 0 else out_chs, out_chs, act_layer=act_layer, adapter_layer=adapter_layer)
            for i in range(depth)
        )

    def forward(self, x: Tensor, site: Sites) -> tuple[Tensor, Tensor]:
        total = self.pool(self.shortcut(x, site))  # (B, Cout, H/2, W/2) (stage 1: H, W)
        inp = self.pool(x)  # (B, Cin, H/2, W/2): the first block's input
        for block in self.blocks:
            out = block(inp, site)
            total = total + out  # running sum: every block output enters exactly once
            inp = total
        return total, out


class MixStyle(nn.Module):
    """MixStyle (Zhou, Yang, Qiao, Xiang, "Domain Generalization with MixStyle", ICLR 2021): in training, with
    probability ``p`` per batch, each sample's per-channel feature mean and standard deviation are mixed with
    those of another sample of the batch (weights ~ Beta(alpha, alpha)), so the network sees new "scanner styles"
    built from the sites it trains on; the identity in evaluation or with ``p = 0``."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.alpha, self.eps = p, alpha, eps

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p <= 0 or x.shape[0] < 2 or float(torch.rand(())) >= self.p:
            return x
        mean = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        std = (x.var((2, 3), keepdim=True) + self.eps).sqrt()
        mean, std = mean.detach(), std.detach()
        normed = (x - mean) / std
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((x.shape[0], 1, 1, 1)).to(x)
        perm = torch.randperm(x.shape[0], device=x.device)
        return normed * (lam * std + (1 - lam) * std[perm]) + lam * mean + (1 - lam) * mean[perm]

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _check_options(*, num_sites: int, block_act: str, init: str, pool: str, width: float) -> None:
    if num_sites < 1:
        raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
    if block_act not in BLOCK_ACTS:
        raise ConfigError(f"unknown block_act {block_act!r}; expected one of {', '.join(BLOCK_ACTS)}")
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    if pool not in ("avg", "flatten"):
        raise ConfigError(f"unknown pool {pool!r}; expected 'avg' or 'flatten'")
    if width <= 0:
        raise ConfigError(f"width must be > 0, got {width}")


class CovidNet(SiteClassifier):
    """COVID-Net trunk; its classifier, optional projection head and optional MS-Net auxiliary heads are the shared
    ones of `crosssite.models.heads.SiteClassifier` (which also documents ``forward(x, site)``).

    Args:
        num_sites: site slots of every site-specific module.
        num_classes: classifier outputs (raw logits).
        width: channel multiplier (1.0 is the paper's network).
        block_act: ``"none"`` (the release) or ``"relu"`` inside PEPX blocks.
        norm: ``"batch"`` (shared), ``"site"`` (one BN copy per site) or ``"none"``.
        adapter: ``None``, ``"series"`` or ``"parallel"`` site-specific adapters in every PEPX block.
        aux_heads: add MS-Net's per-site auxiliary heads (``ModelOutput.aux_logits``).
        projection: add the contrastive projection head (``ModelOutput.projection``).
        pool: ``"avg"`` (adaptive average pool to 2x2, the redesign) or ``"flatten"`` (the original).
        init: ``"default"`` (PyTorch's) or ``"fan_in"`` (see the module docstring).
        mixstyle: probability of `MixStyle` after the stem and after stages 1 and 2 in training (0: off).
        standardise_input: standardise every input image on its own first (`standardise_images`), in training and
            inference alike, so no site's intensity scale reaches the network.
        image_size: input side the ``"flatten"`` head is sized for; unused by ``"avg"``.
        depths, stage_chs, stem_chs, head_hidden, proj_hidden, proj_dim: sizes at width 1.
    """

    def __init__(
        self,
        *,
        num_sites: int,
        num_classes: int = 2,
        width: float = 1.0,
        block_act: str = "none",
        norm: str = "batch",
        adapter: str | None = None,
        aux_heads: bool = False,
        projection: bool = False,
        pool: str = "avg",
        init: str = "default",
        mixstyle: float = 0.0,
        standardise_input: bool = False,
        image_size: int = 224,
        depths: Sequence[int] = (3, 4, 6, 3),
        stage_chs: Sequence[int] = (256, 512, 1024, 2048),
        stem_chs: int = 64,
        head_hidden: Sequence[int] = (1024, 256),
        proj_hidden: int = 1024,
        proj_dim: int = 128,
    ) -> None:
        super().__init__()
        _check_options(num_sites=num_sites, block_act=block_act, init=init, pool=pool, width=width)
        self.model_kwargs = dict(num_classes=num_classes, width=width, block_act=block_act, norm=norm, adapter=adapter,
                                 aux_heads=aux_heads, projection=projection, init=init, mixstyle=mixstyle,
                                 image_size=image_size) | ({"standardise_input": True} if standardise_input else {})
        self.standardise_input = standardise_input  # in model_kwargs only when set: older cards stay as they were
        norm_layer = get_norm_layer(norm, num_sites)
        adapter_layer = get_adapter_layer(adapter, num_sites)
        act_layer = nn.ReLU if block_act == "relu" else nn.Identity
        chs = [channels(c, width) for c in (stem_chs, *stage_chs)]

        self.stem = ConvNormAct(3, chs[0], 7, stride=2, norm_layer=norm_layer)
        self.stem_pool = nn.MaxPool2d(2)
        self.mixstyle = MixStyle(mixstyle)
        self.stages = nn.ModuleList(
            DenseStage(chs[i], chs[i + 1], depth, downsample=i > 0, norm_layer=norm_layer, act_layer=act_layer,
                       adapter_layer=adapter_layer)
            for i, depth in enumerate(depths)
        )
        self.num_features = chs[-1]
        if pool == "avg":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1))
            self.embed_dim = 4 * self.num_features
        else:
            side = self.feature_size(image_size, len(depths))
            self.pool = nn.Flatten(1)
            self.embed_dim = side * side * self.num_features
        self.build_heads(self.embed_dim, num_classes=num_classes, num_sites=num_sites,
                         hidden=[channels(h, width) for h in head_hidden], norm=norm, norm_layer=norm_layer,
                         projection=(channels(proj_hidden, width), channels(proj_dim, width)) if projection else None,
                         aux_heads=aux_heads)
        if init == "fan_in":
            self.init_fan_in()

    @torch.no_grad()
    def init_fan_in(self) -> None:
        """Weights ~ N(0, 1 / fan_in), biases 0, the classifiers' last layers 0 (module docstring)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for head in self.classifier_heads():
            nn.init.zeros_(head.fc.weight)

    @staticmethod
    def feature_size(image_size: int, num_stages: int = 4) -> int:
        """Side of the last feature map for a square input: stride-2 7x7 stem, then 2x2 max-pools."""
        side = (image_size + 1) // 2  # 7x7 conv, stride 2, padding 3
        for _ in range(num_stages):
            side //= 2  # the stem's pool and the pools of stages 2..4
        if side < 1:
            raise ConfigError(f"image_size {image_size} is too small for {num_stages} stages")
        return side

    def forward_features(self, x: Tensor, site: Sites = None) -> Tensor:
        """The last PEPX block's output (B, C, h, w) (7x7x2048 at width 1 and 224 px)."""
        site = self.check_site(site, x.shape[0])
        if self.standardise_input:
            x = standardise_images(x)
        x = self.mixstyle(self.stem_pool(self.stem(x, site)))  # (B, 64, H/4, W/4)
        for i, stage in enumerate(self.stages):
            x, last = stage(x, site)
            if i < 2:  # early stages carry style (Zhou et al.); later ones carry content
                x = self.mixstyle(x)
        return last

# every keyword argument `CovidNet` takes beyond the sizes: what a method or a config may ask of this backbone
COVIDNET_OPTIONS = frozenset({"num_classes", "width", "block_act", "norm", "adapter", "aux_heads", "projection",
                              "init", "mixstyle", "standardise_input", "image_size"})


@register_model(config=ModelConfig(has_norm=False, schedule="step", init="fan_in", options=COVIDNET_OPTIONS))
def covidnet(*, num_sites: int, norm: str | None = None, **options) -> CovidNet:
    """The original COVID-Net (baseline rows of Table I): no BN by default, flatten of the 7x7x2048 map,
    fan-in initialisation by default."""
    options.setdefault("init", model_config("covidnet").init)
    return CovidNet(num_sites=num_sites, norm="none" if norm is None else norm, pool="flatten", **options)


@register_model(config=ModelConfig(options=COVIDNET_OPTIONS))
def covidnet_redesign(*, num_sites: int, norm: str | None = None, **options) -> CovidNet:
    """The redesigned COVID-Net (JBHI 2020, III-A): BN+ReLU on stem and shortcuts, 2x2 average-pooled head."""
    return CovidNet(num_sites=num_sites, norm="batch" if norm is None else norm, pool="avg", **options)
