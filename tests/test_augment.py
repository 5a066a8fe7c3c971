"""ablate.augment: the batched device path against the per-image reference, choice drawing, the
per-image Dataset/DataLoader path and the step-8 epoch iterator. CPU only, small tensors."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from ablate.augment import (AlternatingFlips, Choices, PerImageDataset, augment_batch, augment_one, device_epoch,
                            draw_choices, make_loader, per_image_epoch)
from ablate.config import AugmentationConfig, LoaderConfig
from ablate.data import normalise, pad_reflect


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(x: torch.Tensor, choices: Choices, cutout: int) -> torch.Tensor:
    return torch.stack([augment_one(x[i], *choices[i], cutout) for i in range(len(x))])


def _uint8_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=_gen(seed))


# --------------------------------------------------------------------------------------------------
# augment_one: checked by hand, so that it can serve as the reference


def test_augment_one_by_hand():
    img = torch.arange(1, 3 * 40 * 40 + 1, dtype=torch.float32).view(3, 40, 40)  # every pixel distinct, none 0
    out = augment_one(img, (1, 6), False, (0, 0), 0)
    assert torch.equal(out, img[:, 1:33, 6:38])
    flipped = augment_one(img, (1, 6), True, (0, 0), 0)
    assert torch.equal(flipped[:, :, 0], img[:, 1:33, 37])  # first column of the mirror = last of the crop
    assert torch.equal(flipped[:, :, 31], img[:, 1:33, 6])
    cut = augment_one(img, (1, 6), True, (3, 20), 5)
    zero = cut == 0
    assert zero.sum() == 3 * 5 * 5
    assert zero[:, 3:8, 20:25].all()
    assert torch.equal(cut[:, :3], flipped[:, :3])
    assert (img != 0).all(), "the reference must not write into the padded data set"
    with pytest.raises(ValueError):
        augment_one(img, (9, 0), False, (0, 0), 0)


# --------------------------------------------------------------------------------------------------
# augment_batch == augment_one image by image


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pad,cutout,flip,max_options", [
    (4, 8, True, None),  # step 3_2 to 8_6
    (4, 5, True, None),  # step 8_7, 8_8
    (4, 5, True, 3),  # step 8_1's limited options
    (4, 0, True, None),  # no cutout (steps 0-3_1, 8_9)
    (0, 8, True, None),  # no crop
    (0, 0, False, None),  # nothing at all: a plain copy
])
def test_augment_batch_matches_reference(dtype, pad, cutout, flip, max_options):
    n = 48
    x = torch.randn(n, 3, 32 + 2 * pad, 32 + 2 * pad, generator=_gen(1)).to(dtype)
    aug = AugmentationConfig(crop_pad=pad, flip=flip, cutout=cutout)
    choices = draw_choices(n, aug, _gen(2), max_options)
    out = augment_batch(x, choices, cutout)
    assert out.dtype == dtype and out.shape == (n, 3, 32, 32) and out.is_contiguous()
    assert torch.equal(out, _reference(x, choices, cutout))
    if pad:
        assert choices.crop_y.unique().numel() > 1 and choices.crop_x.unique().numel() > 1
    if flip:
        assert 0 < int(choices.flip.sum()) < n


def test_augment_batch_channels_last_and_uint8():
    n, cutout = 16, 8
    x = torch.randint(1, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=_gen(3))
    choices = draw_choices(n, AugmentationConfig(), _gen(4))
    ref = _reference(x, choices, cutout)
    assert torch.equal(augment_batch(x, choices, cutout), ref)
    out = augment_batch(x.contiguous(memory_format=torch.channels_last), choices, cutout)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)


def test_device_path_never_reads_device_values():
    """On the meta device any .item(), .cpu() or data-dependent branch would raise: running there
    shows the batched path queues work without a host-device sync."""
    aug = AugmentationConfig(crop_pad=4, flip=True, cutout=8)
    x = torch.empty(20, 3, 40, 40, device="meta")
    assert augment_batch(x, draw_choices(20, aug, _gen()), aug.cutout).shape == (20, 3, 32, 32)
    y = torch.empty(20, dtype=torch.int64, device="meta")
    batches = list(device_epoch(x, y, aug, 8, False, _gen(), 200))
    assert [len(b[0]) for b in batches] == [8, 8, 4]


# --------------------------------------------------------------------------------------------------
# draw_choices


def test_draw_choices_ranges():
    n = 4000
    c = draw_choices(n, AugmentationConfig(crop_pad=4, flip=True, cutout=8), _gen())
    assert len(c) == n
    for t, hi in ((c.crop_y, 8), (c.crop_x, 8), (c.cut_y, 24), (c.cut_x, 24)):
        assert t.dtype == torch.int64 and t.shape == (n,)
        assert int(t.min()) == 0 and int(t.max()) == hi  # the whole inclusive range is used
    assert c.flip.dtype == torch.bool
    assert abs(c.flip.float().mean().item() - 0.5) < 0.05
    again = draw_choices(n, AugmentationConfig(crop_pad=4, flip=True, cutout=8), _gen())
    assert all(torch.equal(a, b) for a, b in zip(vars(c).values(), vars(again).values()))
    one = c[7]
    assert one.crop == (int(c.crop_y[7]), int(c.crop_x[7])) and one.flip == bool(c.flip[7])
    assert one.cut == (int(c.cut_y[7]), int(c.cut_x[7]))


def test_draw_choices_disabled_fields_are_zero():
    c = draw_choices(100, AugmentationConfig(crop_pad=0, flip=False, cutout=0), _gen())
    for t in (c.crop_y, c.crop_x, c.cut_y, c.cut_x):
        assert t.dtype == torch.int64 and not t.any()
    assert c.flip.dtype == torch.bool and not c.flip.any()


def test_draw_choices_max_options_groups():
    n = 1000
    c = draw_choices(n, AugmentationConfig(crop_pad=4, flip=True, cutout=8), _gen(), max_options=3)
    for pairs in (zip(c.crop_y.tolist(), c.crop_x.tolist()), zip(c.cut_y.tolist(), c.cut_x.tolist())):
        counts = Counter(pairs)
        assert len(counts) == 3
        assert max(counts.values()) - min(counts.values()) <= 1
    crop_group = c.crop_y * 9 + c.crop_x
    for g in crop_group.unique():  # flips are per image, not per group
        flips = c.flip[crop_group == g].float().mean().item()
        assert 0.4 < flips < 0.6
    # the crop and cutout groups are drawn independently, not one shared shuffle
    assert len(set(zip(crop_group.tolist(), (c.cut_y * 25 + c.cut_x).tolist()))) > 3
    # more options than there are positions: every position at most once per group
    few = draw_choices(n, AugmentationConfig(crop_pad=1, flip=True, cutout=31), _gen(), max_options=200)
    assert len(set(zip(few.crop_y.tolist(), few.crop_x.tolist()))) == 9
    assert len(set(zip(few.cut_y.tolist(), few.cut_x.tolist()))) == 4


# --------------------------------------------------------------------------------------------------
# PerImageDataset and its loader


@pytest.mark.parametrize("preprocess", ["per_image", "once"])
def test_per_image_dataset_bulk_matches_reference(preprocess):
    n, aug = 24, AugmentationConfig(crop_pad=4, flip=True, cutout=8)
    images, labels = _uint8_images(n), torch.arange(n) % 10
    ds = PerImageDataset(images, labels, aug, LoaderConfig(preprocess=preprocess, choices="bulk"))
    with pytest.raises(RuntimeError, match="set_epoch_choices"):
        ds[0]
    choices = draw_choices(n, aug, _gen(5))
    ds.set_epoch_choices(choices)
    padded = pad_reflect(normalise(images), 4)
    for i in range(n):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert torch.equal(x, augment_one(padded[i], *choices[i], aug.cutout))
        assert int(y) == int(labels[i])


@pytest.mark.parametrize("preprocess", ["per_image", "once"])
def test_per_image_dataset_per_call(preprocess):
    n, aug = 32, AugmentationConfig(crop_pad=4, flip=True, cutout=0)
    images = _uint8_images(n)
    cfg = LoaderConfig(preprocess=preprocess, choices="per_call")

    def epoch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        ds = PerImageDataset(images, torch.zeros(n, dtype=torch.int64), aug, cfg)
        return torch.stack([ds[i][0] for i in range(n)])

    first = epoch(11)
    assert torch.equal(first, epoch(11))  # fixed seed: same draws
    assert not torch.equal(first, epoch(12))
    # Every output is one of the 81 x 2 legal crop/flip variants of its own image.
    padded = pad_reflect(normalise(images), 4)
    for i in range(n):
        variants = torch.stack([augment_one(padded[i], (cy, cx), f, (0, 0), 0)
                                for cy in range(9) for cx in range(9) for f in (False, True)])
        assert (variants == first[i]).flatten(1).all(1).any()
    # The per-call choices use the whole range, one RNG call each.
    torch.manual_seed(0)
    ds = PerImageDataset(images, torch.zeros(n, dtype=torch.int64), AugmentationConfig(cutout=8), cfg)
    draws = [ds.choice(0) for _ in range(2000)]
    assert {d.crop[0] for d in draws} == set(range(9)) and {d.crop[1] for d in draws} == set(range(9))
    assert {d.cut[0] for d in draws} == set(range(25)) and {d.cut[1] for d in draws} == set(range(25))
    assert 800 < sum(d.flip for d in draws) < 1200


def test_per_call_workers_draw_different_streams():
    """Two workers seeded alike would give identical batches of identical images."""
    n, aug = 16, AugmentationConfig(crop_pad=4, flip=True, cutout=8)
    images = _uint8_images(1).expand(n, 32, 32, 3).contiguous()
    cfg = LoaderConfig(preprocess="once", choices="per_call", workers=2)
    ds = PerImageDataset(images, torch.zeros(n, dtype=torch.int64), aug, cfg)
    b0, b1 = [x for x, _ in make_loader(ds, 8, cfg, _gen(), pin_memory=False, shuffle=False)]
    assert not torch.equal(b0, b1)


def test_make_loader_workers_bulk_yields_reference_batches():
    n, bs, aug = 44, 8, AugmentationConfig(crop_pad=4, flip=True, cutout=5)
    images, labels = _uint8_images(n, seed=7), torch.arange(n)
    cfg = LoaderConfig(preprocess="once", choices="bulk", workers=2, drop_last=False)
    ds = PerImageDataset(images, labels, aug, cfg)
    g, ref_g = _gen(9), _gen(9)  # for the choices; the loader gets its own generator
    loader = make_loader(ds, bs, cfg, _gen(10), pin_memory=False, shuffle=False)
    assert loader.num_workers == 2 and not loader.persistent_workers
    padded = pad_reflect(normalise(images), 4)
    for _ in range(2):  # the second epoch must see its own choices, not the first epoch's
        batches = list(per_image_epoch(ds, loader, g, aug))
        ref = _reference(padded, draw_choices(n, aug, ref_g), aug.cutout)
        assert [len(x) for x, _ in batches] == [8, 8, 8, 8, 8, 4]
        assert torch.equal(torch.cat([x for x, _ in batches]), ref)
        assert torch.equal(torch.cat([y for _, y in batches]), labels)


def test_per_image_epoch_shuffles_and_keeps_labels_aligned():
    n, bs, aug = 30, 8, AugmentationConfig(crop_pad=4, flip=True, cutout=8)
    images, labels = _uint8_images(n, seed=3), torch.arange(n)
    padded = pad_reflect(normalise(images), 4)
    for drop_last, sizes in ((False, [8, 8, 8, 6]), (True, [8, 8, 8])):
        cfg = LoaderConfig(preprocess="per_image", choices="bulk", workers=0, drop_last=drop_last)
        ds = PerImageDataset(images, labels, aug, cfg)
        g = _gen(1)
        loader = make_loader(ds, bs, cfg, g, pin_memory=False)
        batches = list(per_image_epoch(ds, loader, g, aug, max_options=4))
        assert [len(y) for _, y in batches] == sizes
        seen = torch.cat([y for _, y in batches])
        assert len(set(seen.tolist())) == len(seen)
        assert not torch.equal(seen, torch.arange(len(seen)))  # shuffled
        choices = draw_choices(n, aug, _gen(1), max_options=4)
        for x, y in batches:
            for xi, yi in zip(x, y.tolist()):
                assert torch.equal(xi, augment_one(padded[yi], *choices[yi], aug.cutout))


# --------------------------------------------------------------------------------------------------
# device_epoch


def _label_images(n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is constant i + 1, so any crop/flip/cutout of it still has maximum i + 1."""
    y = torch.arange(n)
    x = (y + 1).float().view(n, 1, 1, 1).expand(n, 3, 32 + 2 * pad, 32 + 2 * pad).contiguous()
    return x, y


@pytest.mark.parametrize("drop_last,sizes", [(False, [16, 16, 16, 2]), (True, [16, 16, 16])])
def test_device_epoch_batches_and_alignment(drop_last, sizes):
    n, aug = 50, AugmentationConfig(crop_pad=4, flip=True, cutout=8)
    x, y = _label_images(n, 4)
    batches = list(device_epoch(x, y, aug, 16, drop_last, _gen(), max_options=200))
    assert [len(b) for b, _ in batches] == sizes
    labels = torch.cat([lb for _, lb in batches])
    assert len(labels.unique()) == len(labels)  # no image twice
    if not drop_last:
        assert torch.equal(labels.sort().values, y)  # every image once
    assert not torch.equal(labels, y[:len(labels)])  # shuffled
    for xb, yb in batches:
        assert xb.shape[1:] == (3, 32, 32)
        assert torch.equal(xb.amax(dim=(1, 2, 3)), (yb + 1).float())  # labels follow their images
        assert (xb == 0).flatten(1).sum(1).eq(3 * 8 * 8).all()  # each got its cutout


def test_device_epoch_equals_augment_batch_then_shuffle():
    n, aug = 40, AugmentationConfig(crop_pad=4, flip=True, cutout=5)
    x = torch.randn(n, 3, 40, 40, generator=_gen(2))
    y = torch.arange(n)
    got = list(device_epoch(x, y, aug, 16, False, _gen(6), None))
    ref_g = _gen(6)
    ref = augment_batch(x, draw_choices(n, aug, ref_g), aug.cutout)
    order = torch.randperm(n, generator=ref_g)
    assert torch.equal(torch.cat([b for b, _ in got]), ref[order])
    assert torch.equal(torch.cat([lb for _, lb in got]), order)


def test_translate2_is_a_shift_by_at_most_two_pixels_with_reflected_borders():
    """airbench's translate (sota-facts 3; conf/augmentation/translate2.yaml): reflect-pad 2, random crop.
    Each output is the image shifted by (dy, dx) in [-2, 2]^2: its interior equals the shifted source,
    and every offset occurs."""
    aug = AugmentationConfig(crop_pad=2, flip=False, cutout=0)
    x = torch.randn(400, 3, 32, 32)
    choices = draw_choices(400, aug, _gen())
    out = augment_batch(pad_reflect(x, 2), choices, 0)
    offsets = set()
    for i in range(400):
        dy, dx = int(choices.crop_y[i]) - 2, int(choices.crop_x[i]) - 2
        offsets.add((dy, dx))
        shifted = torch.roll(x[i], shifts=(-dy, -dx), dims=(1, 2))
        torch.testing.assert_close(out[i, :, 2:-2, 2:-2], shifted[:, 2:-2, 2:-2])
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_alternating_flip_flips_half_then_alternates_every_image():
    """airbench's alternating flip (sota-facts 3): epoch 1 flips a random half; from then on each image's
    orientation is the opposite of its previous epoch's."""
    flips = AlternatingFlips(1000, _gen(3))
    epochs = [flips.next_epoch() for _ in range(5)]
    assert 400 < int(epochs[0].sum()) < 600
    for before, after in zip(epochs, epochs[1:]):
        assert torch.equal(after, ~before)
    # device_epoch applies exactly the given flips
    aug = AugmentationConfig(crop_pad=0, flip=True, cutout=0, alternating_flip=True)
    x, y = torch.randn(8, 3, 32, 32, generator=_gen(4)), torch.arange(8)
    given = torch.tensor([True, False] * 4)
    (xb, yb), = device_epoch(x, y, aug, 8, False, _gen(), None, flips=given)
    for img, label in zip(xb, yb):
        expected = x[int(label)].flip(-1) if given[int(label)] else x[int(label)]
        torch.testing.assert_close(img, expected)
