"""A ResNet-18-style backbone (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016)
with crosssite's norms and adapters: a trunk every reader knows, as a baseline beside COVID-Net for every method.

    stem     7x7/2 conv -> norm -> ReLU, 3x3/2 max-pool
    stages   two basic blocks each, 64, 128, 256, 512 channels (x width), strides 1, 2, 2, 2
    block    3x3 conv -> norm -> ReLU -> 3x3 conv (+ the method's site adapter) -> norm, plus the shortcut
             (identity, or 1x1 conv -> norm where the shape changes), then ReLU
    pool     global average -> 512-d embedding (x width)

The heads are the shared ones (`crosssite.models.heads`): a linear classifier, as in ResNet; the projection head's
hidden layer has the embedding's size. Convolutions are bias-free, since a norm follows each.
"""

from __future__ import annotations

from torch import Tensor, nn

from crosssite.errors import ConfigError
from crosssite.models.adapters import AdapterLayer, get_adapter_layer
from crosssite.models.heads import SiteClassifier, channels
from crosssite.models.norms import NormLayer, Sites, get_norm_layer
from crosssite.models.registry import ModelConfig, register_model

__all__ = ["BasicBlock", "ResNet", "resnet18"]


class ConvNorm(nn.Module):
    """Bias-free convolution, then norm (called with the batch's sites)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, *, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.norm = norm_layer(out_chs)

    def forward(self, x: Tensor, site: Sites) -> Tensor:
        return self.norm(self.conv(x), site)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual shortcut; the adapter (if any) wraps the second convolution."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, *, norm_layer: NormLayer,
                 adapter_layer: AdapterLayer) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_chs, out_chs, 3, stride, norm_layer=norm_layer)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.adapter = adapter_layer(out_chs)
        self.norm2 = norm_layer(out_chs)
        self.shortcut = ConvNorm(in_chs, out_chs, 1, stride, norm_layer=norm_layer) \
            if stride != 1 or in_chs != out_chs else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, site: Sites) -> Tensor:
        y = self.act(self.conv1(x, site))
        y = self.norm2(self.adapter(y, self.conv2(y), site), site)
        return self.act(y + (x if self.shortcut is None else self.shortcut(x, site)))


class ResNet(SiteClassifier):
    """ResNet trunk of basic blocks (``depths`` per stage) under the shared heads."""

    def __init__(self, *, num_sites: int, num_classes: int = 2, width: float = 1.0, norm: str | None = None,
                 adapter: str | None = None, aux_heads: bool = False, projection: bool = False, image_size: int = 224,
                 depths: tuple[int, ...] = (2, 2, 2, 2), stage_chs: tuple[int, ...] = (64, 128, 256, 512),
                 proj_dim: int = 128) -> None:
        super().__init__()
        if image_size < 32:  # the stem and the three strided stages halve the side five times
            raise ConfigError(f"image_size {image_size} is too small for ResNet (at least 32)")
        norm = norm or "batch"
        self.model_kwargs = dict(num_classes=num_classes, width=width, norm=norm, adapter=adapter,
                                 aux_heads=aux_heads, projection=projection, image_size=image_size)
        norm_layer, adapter_layer = get_norm_layer(norm, num_sites), get_adapter_layer(adapter, num_sites)
        chs = [channels(c, width) for c in stage_chs]
        self.stem = ConvNorm(3, chs[0], 7, 2, norm_layer=norm_layer)
        self.stem_pool = nn.Sequential(nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1))
        blocks, in_chs = [], chs[0]
        for i, (depth, out_chs) in enumerate(zip(depths, chs)):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_chs, out_chs, stride, norm_layer=norm_layer, adapter_layer=adapter_layer))
                in_chs = out_chs
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.build_heads(chs[-1], num_classes=num_classes, num_sites=num_sites, hidden=(), norm=norm,
                         norm_layer=norm_layer, projection=(chs[-1], channels(proj_dim, width)) if projection else None,
                         aux_heads=aux_heads)

    def forward_features(self, x: Tensor, site: Sites = None) -> Tensor:
        """The last block's output (B, 512 x width, H/32, W/32)."""
        site = self.check_site(site, x.shape[0])
        x = self.stem_pool(self.stem(x, site))
        for block in self.blocks:
            x = block(x, site)
        return x


@register_model(config=ModelConfig())
def resnet18(*, num_sites: int, **options) -> ResNet:
    """ResNet-18's layout (2, 2, 2, 2 basic blocks) with the site norm; shared BN by default."""
    return ResNet(num_sites=num_sites, **options)
