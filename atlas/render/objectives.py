"""What an icon maximises, read at one layer: a direction, a channel or a single neuron.

Every objective maps the layer's activations (n, C, H, W) to one value per image (so a
batch optimises many independent icons with one summed loss) and also reports the
plain cosine similarity of the centre activation to its target, the figure the paper
uses to say how well an icon represents its cell.
"""

from __future__ import annotations

import torch

MIN_COS = 0.1  # floor on the cosine factor: keeps dot * cos**p increasing while h points away


def centre(acts: torch.Tensor) -> torch.Tensor:
    """(n, C) activation at the centre position of (n, C, H, W) (or (n, C) unchanged)."""
    if acts.dim() == 2:
        return acts
    return acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2]


class Direction:
    """dot(h, S v) * cos(h, S v) ** p at the centre position, one direction per image.

    The cosine factor trades raw magnitude for alignment: without it, the optimiser
    inflates whichever channels are easiest, giving an icon that activates v's largest
    components rather than v. Whitening (S) divides out the layer's typical correlations,
    so the icon shows what is specific to v rather than what all images share.
    """

    def __init__(self, directions: torch.Tensor, whitening: torch.Tensor | None = None, p: float = 2.0):
        v = directions.float()
        target = v @ whitening.float().T if whitening is not None else v
        self.v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.u = target / target.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.p = p

    def to(self, device: torch.device | str) -> Direction:
        self.v, self.u = self.v.to(device), self.u.to(device)
        return self

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        h = centre(acts).float()
        dot = (h * self.u).sum(1)
        if self.p == 0:
            return dot
        cos = dot / h.norm(dim=1).clamp(min=1e-6)
        return dot * cos.clamp(min=MIN_COS) ** self.p

    def cosine(self, acts: torch.Tensor) -> torch.Tensor:
        """cos(h, v) to the unwhitened direction."""
        h = centre(acts).float()
        return (h * self.v).sum(1) / h.norm(dim=1).clamp(min=1e-6)


class Channel(Direction):
    """Mean activation of one channel over all positions (Lucid's 'channel' objective)."""

    def __init__(self, channels: torch.Tensor, n_channels: int):
        super().__init__(torch.nn.functional.one_hot(channels.long(), n_channels).float())
        self.channels = channels.long()

    def to(self, device: torch.device | str) -> Channel:
        super().to(device)
        self.channels = self.channels.to(device)
        return self

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        index = torch.arange(acts.shape[0], device=acts.device)
        return acts[index, self.channels].float().flatten(1).mean(1)


class Neuron(Channel):
    """Activation of one channel at the centre position only."""

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        index = torch.arange(acts.shape[0], device=acts.device)
        return centre(acts)[index, self.channels].float()
