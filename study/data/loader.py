"""Batches from a prepared split, cut by index on the training device.

The whole split is loaded once (hash-checked, :func:`study.data.store.load_split`), moved to the device as
uint8 (N, C, H, W) - a quarter of the float32 size - and every batch is gathered, converted to float in [0, 1]
and flipped there. No per-batch decoding and no DataLoader workers: for 64 x 64 images the whole of CelebA's
train split is 2 GB of uint8, which fits on any training GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

import torch.nn.functional as F

from study.data.color import ycbcr_to_rgb
from study.data.store import load_split, read_manifest


class DeviceSplit:
    """One prepared split held on ``device`` as uint8 (N, C, H, W).

    Args:
        data_dir: a prepared directory (``manifest.json`` + ``<split>.npy``).
        split: ``train``, ``val`` or ``test``.
        device: where batches are produced.
        verify: check the array's sha256 against the manifest first.

    Raises:
        FileNotFoundError, KeyError, DataIntegrityError: from :func:`load_split`.
        ValueError: the split is empty.
    """

    def __init__(self, data_dir: str | Path, split: str, device: torch.device, verify: bool = True) -> None:
        manifest = read_manifest(data_dir)
        #: colour space of the images: rgb (C = 3), grey (C = 1, the luma Y) or ycbcr (C = 3, see below).
        self.color: str = manifest.get("color", "rgb")
        self.chroma_factor: int = int(manifest.get("chroma_factor", 1))
        array = load_split(data_dir, split, verify=verify)  # uint8 (N, H, W, C)
        if array.shape[0] == 0:
            raise ValueError(f"split {split!r} of {data_dir} is empty")
        images = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)  # (N, C, H, W)
        if self.color == "ycbcr":
            # Stored chroma is (N, H / f, W / f, 2); repeat each value over its f x f block so one tensor
            # (N, 3, H, W) carries Y and the exact low-resolution chroma (YCbCrProductLikelihood pools it back).
            chroma = torch.from_numpy(load_split(data_dir, f"{split}_chroma", verify=verify)).to(device)
            chroma = F.interpolate(chroma.permute(0, 3, 1, 2).float(), scale_factor=self.chroma_factor, mode="nearest")
            images = torch.cat([images, chroma.to(torch.uint8)], dim=1)  # (N, 3, H, W)
        self.images = images
        self.device = device
        #: uint8 (N, 3, H, W): the split's RGB before the conversion to YCbCr (``<split>_rgb.npy``), the
        #: reference of pixel metrics for YCbCr models; None for RGB and grey data, for the train split, and for
        #: data prepared before it was stored (pixel metrics then fall back to RGB rebuilt from the stored YCbCr).
        self.rgb_reference: Tensor | None = None
        reference = (manifest.get("rgb_reference") or {}).get(split)
        if self.color == "ycbcr" and reference is not None:
            rgb = load_split(data_dir, reference, verify=verify)  # uint8 (N, H, W, 3)
            if rgb.shape[0] != images.shape[0] or rgb.shape[1:3] != tuple(images.shape[2:]):
                raise ValueError(f"{data_dir}: {reference} has shape {rgb.shape}, {split} {tuple(images.shape)}")
            self.rgb_reference = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous().to(device)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def take(self, index: Tensor) -> Tensor:
        """Images at ``index`` (long, on device) as float (B, C, H, W) in [0, 1]."""
        return self.images[index].float().div_(255.0)

    def take_pixel_reference(self, index: Tensor) -> Tensor:
        """The images pixel metrics compare with, at ``index``: float (B, C', H, W) in [0, 1].

        RGB data: the images; grey: the luma (C' = 1); YCbCr: the original full-resolution RGB when the
        prepared data holds it (:attr:`rgb_reference`), else RGB rebuilt from the stored Y and 16 x 16 chroma.
        """
        if self.rgb_reference is not None:
            return self.rgb_reference[index].float().div_(255.0)
        x = self.take(index)
        return ycbcr_to_rgb(x) if self.color == "ycbcr" else x

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        hflip: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Float batches (B, C, H, W) in [0, 1] covering the split once; the last batch may be smaller.

        ``hflip`` mirrors each image left-right with probability 1/2 (the only augmentation in Dorta et al.).
        ``generator`` must live on the split's device; it makes order and flips reproducible.
        """
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, n, batch_size):
            x = self.take(order[start : start + batch_size])
            if hflip:
                flip = torch.rand(x.shape[0], generator=generator, device=self.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x
