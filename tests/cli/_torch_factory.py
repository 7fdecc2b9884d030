"""A factory the CLI export test loads as ``tests.cli._torch_factory:make_net``."""
from __future__ import annotations


def make_net():
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.dec = nn.Sequential(nn.Conv2d(12, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            e = self.enc(x)
            d = self.dec(torch.cat([e, self.up(self.down(e))], dim=1))
            return torch.sigmoid(self.head(d))

    torch.manual_seed(0)
    return Net()
