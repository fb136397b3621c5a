"""Images in batches: a dataset that skips unreadable files (and says which), a DataLoader whose workers stop with
their parent, and the move of a uint8 batch to the device as floats.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

import numpy as np
import torch

from atlas.data.decoding import load_image, to_tensor
from atlas.data.lists import ImageList
from atlas.data.paths import printable


class ImageDataset(torch.utils.data.Dataset):
    """Indexable images for a DataLoader; unreadable files yield an error string instead of raising.

    ``uint8``: each image as a (crop, crop, 3) uint8 tensor, for :func:`batch_to_float` in the process that runs the
    model: a quarter of the bytes through the loader's shared memory, the float conversion done once per batch where
    the model runs, and the batch arrives in channels-last order without a transposing copy (bench/sample.py, (e)).
    """

    def __init__(self, images: ImageList, resize: int = 256, crop: int = 224, indices: Sequence[int] | None = None,
                 uint8: bool = False, interpolation: str = "bilinear"):
        self.images, self.resize, self.crop, self.uint8 = images, resize, crop, uint8
        self.interpolation = interpolation  # the model's resampling of the resize (bicubic for most ViTs)
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            if index in self.images.skip:
                raise OSError("no longer in the image list (the run keeps its own list; nothing of it was sampled)")
            image = load_image(self.images.paths[index], self.resize, self.crop, self.interpolation)
            image = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)) if self.uint8 else to_tensor(image)
            error = ""
        except Exception as exc:  # noqa: BLE001 - a file that fails the decoder in any way is skipped and counted, not the run's end
            image = torch.zeros(self.crop, self.crop, 3, dtype=torch.uint8) if self.uint8 else torch.zeros(3, self.crop, self.crop)
            error = printable(f"{type(exc).__name__}: {exc}".replace("\n", " "))[:200]
        return index, image, error


def image_loader(dataset: ImageDataset, batch_size: int, workers: int, device: str = "cpu") -> torch.utils.data.DataLoader:
    """The stages' DataLoader over ``dataset``: ``workers`` decoding processes (0: in this one) keeping 4 batches each
    ahead of the model; for a CUDA device the batches land in pinned memory, so the copy to the GPU can overlap."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=False,
                                       prefetch_factor=4 if workers else None, pin_memory=str(device).startswith("cuda"),
                                       worker_init_fn=_stopped_by_parent if workers else None)


def _stopped_by_parent(worker_id: int) -> None:
    """A decoding worker ignores SIGINT and SIGTERM: Ctrl-C (sent to the whole process group) and a SIGTERM to it
    stop the main process, which ends its workers as it leaves the loader. A worker killed by the signal instead would
    make torch report it, with a traceback, on the main process's way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def device_batch(batch: torch.Tensor, good: np.ndarray, device: str = "cpu", channels_last: bool = True) -> torch.Tensor:
    """The readable images (``good``) of a uint8 batch from :class:`ImageDataset` as float32 on ``device``: copied
    there as uint8 (a quarter of the bytes; asynchronously from pinned memory), then :func:`batch_to_float`."""
    x = batch.to(device, non_blocking=True)
    if not good.all():
        x = x[torch.from_numpy(good).to(x.device)]
    return batch_to_float(x, channels_last)


def batch_to_float(batch: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """(B, H, W, 3) uint8 images as (B, 3, H, W) float32 in [0, 1], the values :func:`to_tensor` gives: channels-last
    memory as it comes (the permutation is a view), or contiguous NCHW."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    return x if channels_last else x.contiguous()
