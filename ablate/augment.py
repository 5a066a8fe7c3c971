"""The two augmentation paths of the journey: random 32x32 crop of the reflect-padded image,
horizontal flip, cutout (docs/references.md 0.4).

* Per-image path (steps 0 to 8_0): a torch ``Dataset`` + ``DataLoader`` that augments one image per
  ``__getitem__``, as the 2018 code did. Its two switches replay steps 1_2 and 1_3: pad/normalise per
  image or once for the whole set, and one RNG call per choice or the epoch's choices drawn in bulk.
* Device path (step 8_1 on): the whole padded training set lives on the device and one epoch is
  augmented in a few vectorised tensor ops, then shuffled and cut into batches.

Both paths read the same :class:`Choices`, so ``augment_batch`` can be checked against the slow
reference ``augment_one`` image by image.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, fields
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ablate.config import AugmentationConfig, LoaderConfig
from ablate.data import IMAGE_SIZE, normalise, pad_reflect
from ablate.device import memory_format_of

LOADER_KINDS = ("per_image", "device")  # loader.kind: the 2018 DataLoader path, or the 2019 device path
PREPROCESS = ("per_image", "once")  # loader.preprocess: per __getitem__ (step 0), or once (step 1_2 on)
CHOICES = ("per_call", "bulk")  # loader.choices: one RNG call per choice, or an epoch's in bulk (step 1_3 on)

# Images per chunk when the per-image dataset preprocesses the whole set once; bounds the float
# temporaries to a few hundred MB instead of twice the padded set.
_PREPROCESS_CHUNK = 8192


class Choice(NamedTuple):
    """One image's random choices, in the argument order of :func:`augment_one`."""

    crop: tuple[int, int]  # (y, x) offset of the 32x32 crop in the padded image
    flip: bool
    cut: tuple[int, int]  # (y, x) top-left corner of the cutout square inside the crop


@dataclass
class Choices:
    """The random choices of one epoch, one entry per image (index = position in the data set)."""

    crop_y: Tensor  # int64 N, in [0, 2 * crop_pad]
    crop_x: Tensor
    flip: Tensor  # bool N
    cut_y: Tensor  # int64 N, in [0, 32 - cutout]
    cut_x: Tensor

    def __len__(self) -> int:
        return len(self.flip)

    def __getitem__(self, i: int) -> Choice:
        return Choice((int(self.crop_y[i]), int(self.crop_x[i])), bool(self.flip[i]),
                      (int(self.cut_y[i]), int(self.cut_x[i])))

    def to(self, device: torch.device | str) -> Choices:
        # non_blocking from the CPU: a host-to-device copy then does not wait for queued kernels.
        # Never from a device to the host, where the values might be read before they arrive.
        return Choices(*(t.to(device, non_blocking=t.device.type == "cpu")
                         for t in (getattr(self, f.name) for f in fields(self))))

    def rows(self) -> list[Choice]:
        """All choices as Python tuples: one bulk conversion instead of five tensor reads per image."""
        cols = [getattr(self, f.name).tolist() for f in fields(self)]
        return [Choice((cy, cx), fl, (uy, ux)) for cy, cx, fl, uy, ux in zip(*cols)]


# --------------------------------------------------------------------------------------------------
# Drawing choices


def _positions(n: int, span: int, generator: torch.Generator, max_options: Optional[int]) -> tuple[Tensor, Tensor]:
    """(y, x) positions in [0, span) for n images, independently per image or, with ``max_options``,
    from at most that many distinct positions, each given to an equal share of the images."""
    dev = generator.device
    if span <= 1:  # nothing to choose (no crop or cutout): don't spend RNG calls on it
        zeros = torch.zeros(n, dtype=torch.int64, device=dev)
        return zeros, zeros.clone()
    if max_options is None:
        yx = torch.randint(0, span, (2, n), generator=generator, device=dev)
        return yx[0], yx[1]
    # A3 8.1: pick k random options, shuffle the images and split them into k equal groups, one per
    # option. Group j holds the positions [j*n/k, (j+1)*n/k) of the shuffle, so sizes differ by <= 1.
    k = min(max_options, span * span)
    options = torch.randperm(span * span, generator=generator, device=dev)[:k]
    order = torch.randperm(n, generator=generator, device=dev)
    group = torch.arange(n, device=dev) * k // max(n, 1)
    flat = torch.empty(n, dtype=torch.int64, device=dev)
    flat[order] = options[group]
    return flat // span, flat % span


def draw_choices(n: int, aug: AugmentationConfig, generator: torch.Generator,
                 max_options: Optional[int] = None, flips: Optional[Tensor] = None) -> Choices:
    """The random choices for an epoch of ``n`` images in a few bulk RNG calls (step 1_3 on).

    With ``max_options`` crop offsets and cutout positions each use at most that many distinct
    randomly chosen options (step 8_1: 200); flips stay independent per image, unless ``flips`` gives
    them (the alternating flip). Disabled augmentations give zeros (and never flip).
    """
    crop_y, crop_x = _positions(n, 2 * aug.crop_pad + 1, generator, max_options)
    if flips is not None:
        flip = flips.to(generator.device)
    elif aug.flip:
        flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    else:
        flip = torch.zeros(n, dtype=torch.bool, device=generator.device)
    span = IMAGE_SIZE - aug.cutout + 1 if aug.cutout > 0 else 1
    cut_y, cut_x = _positions(n, span, generator, max_options)
    return Choices(crop_y, crop_x, flip, cut_y, cut_x)


class AlternatingFlips:
    """airbench's alternating ("derandomised") flip: in the first epoch a random half of the images is
    flipped; from then on each image's orientation alternates every epoch (flip = first flip XOR odd
    epoch). Every image is seen both ways in any two consecutive epochs, where random flips leave a
    quarter of them one way twice."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.first: Optional[Tensor] = None
        self.epoch = 0

    def next_epoch(self) -> Tensor:
        """The next epoch's flips, one bool per image in data-set order."""
        if self.first is None:  # drawn with the run's generator when the first epoch starts
            self.first = torch.rand(self.n, generator=self.generator, device=self.generator.device) < 0.5
        flips = self.first ^ bool(self.epoch % 2)
        self.epoch += 1
        return flips

    def state_dict(self) -> dict:  # for checkpoints (ablate.checkpoint)
        return dict(first=self.first, epoch=self.epoch)

    def load_state_dict(self, state: dict) -> None:
        self.first, self.epoch = state["first"], state["epoch"]


# --------------------------------------------------------------------------------------------------
# Applying choices


def augment_one(img: Tensor, crop: tuple[int, int], flip: bool, cut: tuple[int, int], cutout: int) -> Tensor:
    """Slow reference on one padded C x H x W image: crop 32x32 at ``crop`` (y, x), mirror if
    ``flip``, then zero the ``cutout`` x ``cutout`` square at ``cut`` (y, x) of the result (0 is the
    mean colour once the image is normalised)."""
    (y, x), (cy, cx) = crop, cut
    if y < 0 or x < 0 or y + IMAGE_SIZE > img.shape[-2] or x + IMAGE_SIZE > img.shape[-1]:
        raise ValueError(f"crop at {crop} does not fit a {IMAGE_SIZE}x{IMAGE_SIZE} crop in shape {tuple(img.shape)}")
    out = img[:, y:y + IMAGE_SIZE, x:x + IMAGE_SIZE]
    if flip:
        out = out.flip(-1)
    if cutout > 0:
        out = out.clone()  # never write into the data set the crop is a view of
        out[:, cy:cy + cutout, cx:cx + cutout] = 0
    return out.contiguous()


def augment_batch(x: Tensor, choices: Choices, cutout: int) -> Tensor:
    """Batched ``augment_one`` for a padded N x C x H x W batch on any device and dtype.

    Crop and flip are one gather: output pixel (i, r, c) reads row ``crop_y[i] + r`` and column
    ``crop_x[i] + c`` (or ``31 - c`` when flipped). The index tensors broadcast (N,1,1), (N,32,1),
    (N,1,32), so nothing of size N x 32 x 32 is materialised besides the result. Cutout is one
    masked_fill. There is no Python loop over images and no read of device values on the host.
    """
    n, _, h, w = x.shape
    if h < IMAGE_SIZE or w < IMAGE_SIZE:
        raise ValueError(f"augment_batch needs images of at least {IMAGE_SIZE}x{IMAGE_SIZE}, got {h}x{w}")
    dev = x.device
    c = choices.to(dev)
    ar = torch.arange(IMAGE_SIZE, device=dev)
    rows = (c.crop_y[:, None] + ar)[:, :, None]
    cols = (c.crop_x[:, None] + torch.where(c.flip[:, None], IMAGE_SIZE - 1 - ar, ar))[:, None, :]
    # Advanced indices separated by a slice put their broadcast dims first: the result is N x 32 x 32 x C.
    out = x[torch.arange(n, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if cutout > 0:
        in_y = (ar >= c.cut_y[:, None]) & (ar < c.cut_y[:, None] + cutout)
        in_x = (ar >= c.cut_x[:, None]) & (ar < c.cut_x[:, None] + cutout)
        out = out.masked_fill(in_y[:, None, :, None] & in_x[:, None, None, :], 0)
    return out.contiguous(memory_format=memory_format_of(x))  # the layout the caller chose


def device_epoch(x_padded: Tensor, y: Tensor, aug: AugmentationConfig, batch_size: int, drop_last: bool,
                 generator: torch.Generator, max_options: Optional[int],
                 flips: Optional[Tensor] = None) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of the step-8 path: draw choices, augment the whole set on its device at once,
    shuffle, yield ``batch_size`` batches (the last partial one only if not ``drop_last``). ``flips``,
    when given, are the epoch's flips (``AlternatingFlips``) instead of random ones."""
    n = len(x_padded)
    data = augment_batch(x_padded, draw_choices(n, aug, generator, max_options, flips), aug.cutout)
    order = torch.randperm(n, generator=generator, device=generator.device)
    order = order.to(x_padded.device, non_blocking=order.device.type == "cpu")
    y = y.to(x_padded.device)
    stop = n - n % batch_size if drop_last else n  # from sizes only: no device value is read
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield data[idx], y[idx]


# --------------------------------------------------------------------------------------------------
# Per-image path


class PerImageDataset(Dataset):
    """The 2018-style training set: ``__getitem__`` augments one image with ``augment_one``.

    ``loader.preprocess``: 'per_image' keeps the raw uint8 NHWC images and pads, normalises and
    transposes the requested image on every call (step 0's cost); 'once' does it for the whole set
    at construction (step 1_2). ``loader.choices``: 'per_call' makes one RNG call per random choice
    on a per-process generator (steps 0 to 1_2); 'bulk' reads the choices that
    :meth:`set_epoch_choices` stored before the epoch (step 1_3 on).
    """

    def __init__(self, images: Tensor, labels: Tensor, aug: AugmentationConfig, loader: LoaderConfig):
        if loader.preprocess not in PREPROCESS:
            raise ValueError(f"loader.preprocess={loader.preprocess!r} is not 'per_image' or 'once'")
        if loader.choices not in CHOICES:
            raise ValueError(f"loader.choices={loader.choices!r} is not 'per_call' or 'bulk'")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.aug = aug
        self.preprocess = loader.preprocess
        self.choice_mode = loader.choices
        self.labels = labels.to(torch.int64)
        if self.preprocess == "once":
            n, h, w, c = images.shape
            p = aug.crop_pad
            self.x = torch.empty(n, c, h + 2 * p, w + 2 * p, dtype=torch.float32)
            for s in range(0, n, _PREPROCESS_CHUNK):
                self.x[s:s + _PREPROCESS_CHUNK] = pad_reflect(normalise(images[s:s + _PREPROCESS_CHUNK]), p)
        else:
            self.x = images
        self._rows: Optional[list[Choice]] = None
        self._gen: Optional[torch.Generator] = None
        self._gen_pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch_choices(self, choices: Choices) -> None:
        """Store the epoch's choices (bulk mode); call before the loader's iterator forks its workers."""
        if len(choices) != len(self):
            raise ValueError(f"{len(choices)} choices for {len(self)} images")
        self._rows = choices.rows()

    def padded(self, i: int) -> Tensor:
        """Image ``i`` normalised, reflect-padded, C x H x W float32."""
        if self.preprocess == "once":
            return self.x[i]
        return pad_reflect(normalise(self.x[i:i + 1]), self.aug.crop_pad)[0]

    def _generator(self) -> torch.Generator:
        # One generator per process: DataLoader workers are forked with a copy of this object and
        # torch seeds each worker with base_seed + worker_id, so seeding from torch.initial_seed()
        # gives every worker (and every epoch's fresh workers) its own stream.
        if self._gen is None or self._gen_pid != os.getpid():
            self._gen = torch.Generator().manual_seed(torch.initial_seed())
            self._gen_pid = os.getpid()
        return self._gen

    def choice(self, i: int) -> Choice:
        """Image ``i``'s choices: the stored bulk ones, or freshly drawn with one RNG call each."""
        if self.choice_mode == "bulk":
            if self._rows is None:
                raise RuntimeError("loader.choices=bulk: call set_epoch_choices (or use per_image_epoch) before iterating")
            return self._rows[i]
        g, aug = self._generator(), self.aug

        def draw(span: int) -> int:
            return int(torch.randint(span, (1,), generator=g)) if span > 1 else 0

        crop = (draw(2 * aug.crop_pad + 1), draw(2 * aug.crop_pad + 1))
        flip = bool(torch.rand(1, generator=g) < 0.5) if aug.flip else False
        span = IMAGE_SIZE - aug.cutout + 1 if aug.cutout > 0 else 1
        return Choice(crop, flip, (draw(span), draw(span)))

    def state_dict(self) -> dict:
        """For checkpoints: the per-call choices' generator, which carries over epochs when the images
        are augmented in this process (``loader.workers=0``; workers start from fresh seeds each epoch)."""
        return dict(generator=None if self._gen is None else self._gen.get_state())

    def load_state_dict(self, state: dict) -> None:
        if state["generator"] is not None:
            self._generator().set_state(state["generator"])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        crop, flip, cut = self.choice(i)
        return augment_one(self.padded(i), crop, flip, cut, self.aug.cutout), self.labels[i]


def make_loader(dataset: PerImageDataset, batch_size: int, loader: LoaderConfig, generator: torch.Generator,
                pin_memory: bool, shuffle: bool = True) -> DataLoader:
    """A torch DataLoader as the 2018 code used it. ``persistent_workers=False``: PyTorch 0.4
    restarted its workers every epoch and that cost is part of what steps 1_2 to 1_4 remove.
    ``shuffle=False`` is for tests and evaluation."""
    # Fork, as PyTorch 0.4 on Linux did: workers inherit the dataset instead of unpickling it.
    ctx = "fork" if loader.workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=loader.workers, drop_last=loader.drop_last, persistent_workers=False,
                      pin_memory=pin_memory, multiprocessing_context=ctx)


def per_image_epoch(dataset: PerImageDataset, loader: DataLoader, generator: torch.Generator,
                    aug: AugmentationConfig, max_options: Optional[int] = None) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of the per-image path. In bulk mode the epoch's choices are drawn and stored on the
    dataset before the loader's iterator exists, so the workers it forks see them."""
    if dataset.choice_mode == "bulk":
        dataset.set_epoch_choices(draw_choices(len(dataset), aug, generator, max_options))
    yield from loader
