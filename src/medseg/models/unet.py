"""The original U-Net (Ronneberger et al., 2015) and the nested U-Net++ (Zhou et al., 2018), written here.

Deviations from the papers (also in docs/models.md):
- 3x3 convolutions use padding=1, so the output has the input's size (the paper used valid convolutions and
  overlap-tile inference; a same-size output is what every 2D pipeline here expects).
- BatchNorm after each convolution is on by default (`batch_norm=False` gives the paper's plain conv+ReLU).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.models.table import register_model


class DoubleConv(nn.Sequential):
    """(3x3 conv -> [BN] -> ReLU) x 2, the unit of both networks."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool = True, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for c_in in (in_ch, out_ch):
            layers.append(nn.Conv2d(c_in, out_ch, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            if dropout:
                layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


def _init_he(module: nn.Module) -> None:
    # The U-Net paper draws weights from N(0, sqrt(2/N)) (He init) so deep ReLU stacks train from scratch.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class UNet(nn.Module):
    """Contracting path of `depth` 2x2 max-pools, expanding path of 2x2 up-convolutions that halve the channels,
    skip connections by concatenation, 1x1 conv to classes. Channels: base * 2**level."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 64,
        depth: int = 4,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        c_in = in_channels
        for i, w in enumerate(widths):
            # The paper puts dropout at the end of the contracting path (the two deepest levels).
            self.encoders.append(DoubleConv(c_in, w, batch_norm, dropout if i >= depth - 1 else 0.0))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth))
        self.decoders = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], batch_norm) for i in range(depth))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        _init_he(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.ups))):
            x = self.decoders[i](torch.cat([skips[i], self.ups[i](x)], dim=1))
        return self.head(x)


class UNetPlusPlus(nn.Module):
    """Nested U-Net: node X[i][j] = conv(cat(X[i][0..j-1], up(X[i+1][j-1]))), dense skip pathways.

    With `deep_supervision` the output is the mean of the four full-resolution heads (the paper's "accurate" mode);
    without it only the last head X[0][depth] is used (the paper's default output).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        depth: int = 4,
        batch_norm: bool = True,
        dropout: float = 0.0,
        deep_supervision: bool = False,
    ):
        super().__init__()
        self.depth = depth
        self.deep_supervision = deep_supervision
        w = [base_channels * 2**i for i in range(depth + 1)]
        self.pool = nn.MaxPool2d(2)
        # nodes[i][j] for i + j <= depth; ups[i][j] upsamples X[i+1][j] to level i.
        self.nodes = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in range(depth + 1):
            level_nodes, level_ups = nn.ModuleList(), nn.ModuleList()
            for j in range(depth + 1 - i):
                c_in = in_channels if (i, j) == (0, 0) else (w[i - 1] if j == 0 else w[i] * (j + 1))
                level_nodes.append(DoubleConv(c_in, w[i], batch_norm, dropout))
                if i < depth and j < depth - i:
                    level_ups.append(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2))
            self.nodes.append(level_nodes)
            self.ups.append(level_ups)
        n_heads = depth if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv2d(w[0], num_classes, 1) for _ in range(n_heads))
        _init_he(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid: list[list[torch.Tensor]] = [[] for _ in range(self.depth + 1)]
        for i in range(self.depth + 1):
            grid[i].append(self.nodes[i][0](x if i == 0 else self.pool(grid[i - 1][0])))
            # After the backbone node X[i][0], every node on the anti-diagonal above it can be computed.
            for j in range(1, i + 1):
                r = i - j
                up = self.ups[r][j - 1](grid[r + 1][j - 1])
                grid[r].append(self.nodes[r][j](torch.cat([*grid[r], up], dim=1)))
        if self.deep_supervision:
            return torch.stack([h(grid[0][j + 1]) for j, h in enumerate(self.heads)]).mean(0)
        return self.heads[0](grid[0][self.depth])


def _depth_stride(image_size: tuple[int, int], depth: int = 4, **_: object) -> int:
    return 2 ** int(depth)  # one 2x2 max-pool per level


def _check_depth(image_size: tuple[int, int], depth: int) -> None:
    # The registry checks the default depth's multiple (16); a deeper net needs 2**depth.
    if image_size[0] % 2**depth or image_size[1] % 2**depth:
        raise ConfigError(f"depth {depth} needs image_size multiples of {2**depth}, got {image_size[0]}x{image_size[1]}")


@register_model(
    "unet",
    family="cnn",
    description="U-Net (Ronneberger 2015), written here: 4 levels, double 3x3 conv, 64 base channels, padding=1",
    paper="Ronneberger, Fischer, Brox. U-Net. MICCAI 2015. arXiv:1505.04597",
    # The paper prints no count; 31.0M is the count of its published layer list (64..1024 channels).
    paper_params_m=31.0,
    size_multiple=16,
    size_rule=_depth_stride,
)
def build_unet(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    base_channels: int = 64,
    depth: int = 4,
    batch_norm: bool = True,
    dropout: float = 0.0,
) -> nn.Module:
    _check_depth(image_size, depth)
    return UNet(in_channels, num_classes, base_channels, depth, batch_norm, dropout)


@register_model(
    "unetpp",
    family="cnn",
    description="UNet++ (Zhou 2018), written here: nested dense skips, filters 32..512, last head (no deep sup.)",
    paper="Zhou et al. UNet++: A Nested U-Net Architecture for Medical Image Segmentation. DLMIA 2018",
    paper_params_m=9.04,
    size_multiple=16,
    size_rule=_depth_stride,
)
def build_unetpp(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    base_channels: int = 32,
    depth: int = 4,
    batch_norm: bool = True,
    dropout: float = 0.0,
    deep_supervision: bool = False,
) -> nn.Module:
    _check_depth(image_size, depth)
    return UNetPlusPlus(in_channels, num_classes, base_channels, depth, batch_norm, dropout, deep_supervision)
