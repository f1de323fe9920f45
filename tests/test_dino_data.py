"""The DINO demo's data side (``launch/dino/data.py``): determinism of the images and the
crops, the global RNG left alone, the sampler's order independent of the world size and
resumable under another one, and the image folder reader without PIL."""

from __future__ import annotations

import importlib.util
import pickle
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

from dino.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    MultiCropAugmentation,
    MultiCropDataset,
    ResumableDistributedSampler,
    SyntheticImages,
    load_image,
    mix_seed,
)

HAS_PIL = importlib.util.find_spec("PIL") is not None


class Indices(Dataset):
    """Sample i is i: what a sampler yields is what a DataLoader gives back."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


# --------------------------------------------------------------------------- synthetic


def test_synthetic_images_deterministic_and_well_formed() -> None:
    a, b = SyntheticImages(40, seed=3), SyntheticImages(40, seed=3)
    other = SyntheticImages(40, seed=4)
    assert len(a) == 40 and a.targets == [i % 8 for i in range(40)]
    for i in (0, 7, 39):
        x, y = a[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert isinstance(y, int) and y == i % 8
        assert torch.equal(x, b[i][0])
        assert torch.equal(x, a[i][0])  # again, same object
        assert not torch.equal(x, other[i][0])
    assert not torch.equal(a[0][0], a[8][0])  # same class, other sample
    # sample i does not depend on how many samples the set has
    assert torch.equal(SyntheticImages(10, seed=3)[5][0], a[5][0])
    assert SyntheticImages(4, image_size=16, num_classes=2)[1][0].shape == (3, 16, 16)


def test_synthetic_images_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ds = SyntheticImages(16)
    ds[5]
    assert torch.equal(torch.get_rng_state(), before)


def test_mix_seed_stable_and_in_range() -> None:
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert mix_seed(1, 2, 3) != mix_seed(1, 2, 4) != mix_seed(1, 3, 2)
    for parts in ((0,), (-1, 2**70), (0, 0, 0)):
        assert 0 <= mix_seed(*parts) < 2**63
    torch.Generator().manual_seed(mix_seed(-5, 2**64 + 3))


# --------------------------------------------------------------------------- multi-crop


def test_augmentation_shapes_and_generator_determinism() -> None:
    aug = MultiCropAugmentation(local_crops_number=3, global_size=24, local_size=12)
    img = SyntheticImages(4, image_size=40)[1][0]
    crops = aug(img, torch.Generator().manual_seed(7))
    assert len(crops) == 5 == aug.num_crops
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    # normalised from [0, 1]: within [(0 - mean) / std, (1 - mean) / std]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for c in crops:
        assert (c >= (0 - mean) / std - 1e-5).all() and (c <= (1 - mean) / std + 1e-5).all()
    again = aug(img, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(crops, again, strict=True))
    other = aug(img, torch.Generator().manual_seed(8))
    assert not all(torch.equal(x, y) for x, y in zip(crops, other, strict=True))


def test_crop_params_keep_scale_ratio_and_bounds_and_fall_back_to_a_central_crop() -> None:
    aug = MultiCropAugmentation()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = aug.crop_params(32, 48, (0.05, 0.4), g)
        assert top >= 0 and top + h <= 32 and left >= 0 and left + w <= 48
        assert 0.05 * 0.75 <= h * w / (32 * 48) <= 0.4 * 1.25  # the scale, up to rounding
        assert 0.75 * 0.9 <= w / h <= 4 / 3 * 1.1 or min(h, w) < 4
    # scale above what fits: 10 tries fail, central crop clipped to the ratio range
    assert aug.crop_params(10, 40, (5.0, 6.0), g) == (0, 13, 10, 13)
    assert aug.crop_params(20, 20, (5.0, 6.0), g) == (0, 0, 20, 20)


def test_color_jitter_identity_factors_and_hue_round_trip() -> None:
    img = SyntheticImages(2)[0][0]
    aug = MultiCropAugmentation(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert torch.equal(aug.color_jitter(img, torch.Generator().manual_seed(0)), img)
    from dino.data import _adjust_hue  # the HSV round trip, hue shifted by 0

    assert torch.allclose(_adjust_hue(img, 0.0), img, atol=1e-5)
    assert not torch.allclose(_adjust_hue(img, 0.25), img, atol=1e-2)


def test_multicrop_dataset_deterministic_per_seed_epoch_index() -> None:
    base = SyntheticImages(20, seed=1)
    a = MultiCropDataset(base, MultiCropAugmentation(), seed=5)
    b = MultiCropDataset(SyntheticImages(20, seed=1), MultiCropAugmentation(), seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    crops, label = a[3]
    assert label == 3 and len(crops) == 6
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert all(c.dtype == torch.float32 for c in crops)
    same = b[3][0]
    assert all(torch.equal(x, y) for x, y in zip(crops, same, strict=True))
    b.set_epoch(3)
    assert not any(torch.equal(x, y) for x, y in zip(crops, b[3][0], strict=True))
    c = MultiCropDataset(base, MultiCropAugmentation(), seed=6)
    c.set_epoch(2)
    assert not any(torch.equal(x, y) for x, y in zip(crops, c[3][0], strict=True))


def test_multicrop_dataset_leaves_global_rng_alone() -> None:
    ds = MultiCropDataset(SyntheticImages(8), MultiCropAugmentation(), seed=0)
    torch.manual_seed(9)
    before = torch.get_rng_state()
    for i in range(4):
        ds[i]
    assert torch.equal(torch.get_rng_state(), before)


def test_multicrop_collate_and_same_crops_on_any_world_size() -> None:
    ds = MultiCropDataset(SyntheticImages(32), MultiCropAugmentation(), seed=0)
    ds.set_epoch(1)
    sampler = ResumableDistributedSampler(ds, num_replicas=2, rank=1, global_batch_size=8)
    sampler.set_epoch(1)
    crops, labels = next(iter(DataLoader(ds, batch_size=4, sampler=sampler)))
    assert isinstance(crops, list) and len(crops) == 6
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 4
    # the same samples loaded one by one (as a single rank would) give the same crops
    idx = list(sampler)[:4]
    assert labels.tolist() == [i % 8 for i in idx]
    for k, i in enumerate(idx):
        single = ds[i][0]
        assert all(torch.equal(crops[j][k], single[j]) for j in range(6))


def test_multicrop_same_crops_in_dataloader_workers() -> None:
    ds = MultiCropDataset(SyntheticImages(8), MultiCropAugmentation(local_crops_number=1), 3)
    ds.set_epoch(1)
    main = list(DataLoader(ds, batch_size=4))
    workers = list(DataLoader(ds, batch_size=4, num_workers=2))
    for (a, la), (b, lb) in zip(main, workers, strict=True):
        assert torch.equal(la, lb)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- sampler


def _global_steps(n: int, world: int, global_batch: int, epoch: int, seed: int = 0):
    """Per global step, the set of samples the ``world`` ranks' DataLoaders give."""
    ds = Indices(n)
    loaders = []
    for r in range(world):
        s = ResumableDistributedSampler(ds, world, r, global_batch, seed=seed)
        s.set_epoch(epoch)
        loaders.append(DataLoader(ds, batch_size=global_batch // world, sampler=s))
    return [sorted(torch.cat(batches).tolist()) for batches in zip(*loaders, strict=True)]


def test_sampler_union_over_ranks_independent_of_world_size() -> None:
    n, gb = 103, 8
    steps = {w: _global_steps(n, w, gb, epoch=1) for w in (1, 2, 4)}
    assert steps[1] == steps[2] == steps[4]
    assert len(steps[1]) == n // gb
    g = torch.Generator()
    g.manual_seed(0 + 1)
    perm = torch.randperm(n, generator=g).tolist()
    assert steps[1] == [sorted(perm[s * gb : (s + 1) * gb]) for s in range(n // gb)]
    # the same permutation as DistributedSampler's
    ref: DistributedSampler[int] = DistributedSampler(Indices(n), 1, 0, shuffle=True, seed=0)
    ref.set_epoch(1)
    assert list(ref) == perm
    assert _global_steps(n, 2, gb, epoch=2) != steps[2]


def test_sampler_rank_shares_and_lengths() -> None:
    ds = Indices(50)
    s = ResumableDistributedSampler(ds, num_replicas=4, rank=3, global_batch_size=12, seed=2)
    assert s.steps_per_epoch == 4 and len(s) == 12 and s.num_samples == 12
    assert list(s) == s.permutation()[3:48:4]
    s.advance(3)
    assert len(s) == 3 and list(s) == s.permutation()[36 + 3 : 48 : 4]
    s.advance()
    assert len(s) == 0 and list(s) == []
    with pytest.raises(ValueError, match="past the end"):
        s.advance()
    plain = ResumableDistributedSampler(ds, 2, 0, 4, shuffle=False)
    assert list(plain) == list(range(0, 48, 2))


def test_sampler_resume_under_another_world_size() -> None:
    n, gb, k = 70, 8, 3
    straight = _global_steps(n, 2, gb, epoch=4, seed=11)

    old = ResumableDistributedSampler(Indices(n), 2, 0, gb, seed=11)
    old.set_epoch(4)
    old.advance(k)
    state = pickle.loads(pickle.dumps(old.state_dict()))
    assert state == {
        "epoch": 4,
        "consumed": k * gb,
        "seed": 11,
        "global_batch_size": gb,
        "num_samples": n,
    }
    assert all(type(v) is int for v in state.values())

    ds = Indices(n)
    loaders = []
    for r in range(4):
        s = ResumableDistributedSampler(ds, 4, r, gb, seed=11)
        s.load_state_dict(state)
        s.set_epoch(4)  # the resumed loop enters the same epoch: the position stays
        assert (s.epoch, s.consumed) == (4, k * gb)
        loaders.append(DataLoader(ds, batch_size=gb // 4, sampler=s))
    resumed = [sorted(torch.cat(b).tolist()) for b in zip(*loaders, strict=True)]
    assert resumed == straight[k:]

    s.set_epoch(5)
    assert (s.epoch, s.consumed) == (5, 0) and len(s) == (n // gb) * gb // 4


def test_sampler_errors() -> None:
    ds = Indices(40)
    with pytest.raises(ValueError, match=r"10.*4|4.*10") as e:
        ResumableDistributedSampler(ds, num_replicas=4, rank=0, global_batch_size=10)
    assert "10" in str(e.value) and "4" in str(e.value)
    with pytest.raises(ValueError, match="40") as e:
        ResumableDistributedSampler(ds, num_replicas=2, rank=0, global_batch_size=64)
    assert "64" in str(e.value)

    saved = ResumableDistributedSampler(ds, 2, 0, 8, seed=1).state_dict()
    s = ResumableDistributedSampler(ds, 2, 0, 8, seed=2)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict(saved)
    with pytest.raises(ValueError, match="global_batch_size"):
        ResumableDistributedSampler(ds, 2, 0, 4, seed=1).load_state_dict(saved)
    with pytest.raises(ValueError, match="num_samples"):
        ResumableDistributedSampler(Indices(41), 2, 0, 8, seed=1).load_state_dict(saved)
    with pytest.raises(ValueError, match="consumed"):
        ResumableDistributedSampler(ds, 2, 0, 8, seed=1).load_state_dict({**saved, "consumed": 4})
    assert (s.epoch, s.consumed) == (0, 0)  # a refused state changes nothing


# --------------------------------------------------------------------------- image folder


def _write_ppm(path: Path, img: np.ndarray, comment: bool = True) -> None:
    """Binary P6 (HxWx3) or P5 (HxW) uint8."""
    h, w = img.shape[:2]
    magic = b"P6" if img.ndim == 3 else b"P5"
    note = b"# written by the test\n" if comment else b""
    path.write_bytes(magic + b"\n" + note + f"{w} {h}\n255\n".encode() + img.tobytes())


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """A valid 8-bit RGB PNG, by hand."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_image_folder_reads_npy_pt_and_pnm_by_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "deeper").mkdir(parents=True)
    np.save(tmp_path / "cat" / "a.npy", rgb)  # HxWxC uint8
    torch.save(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, tmp_path / "cat" / "b.pt")
    np.save(tmp_path / "cat" / "deeper" / "c.npy", rgb.transpose(2, 0, 1) / 255.0)  # CxHxW
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _write_ppm(tmp_path / "dog" / "d.ppm", rgb)
    _write_ppm(tmp_path / "dog" / "e.pgm", grey)
    ascii_ppm = "P3\n# ascii\n5 6\n255\n" + " ".join(str(v) for v in rgb.reshape(-1)) + "\n"
    (tmp_path / "dog" / "f.ppm").write_text(ascii_ppm)
    (tmp_path / "dog" / "g.pgm").write_text(
        "P2 5 6 255\n" + "\n".join(" ".join(map(str, row)) for row in grey)
    )

    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    expected_grey = (torch.from_numpy(grey).float() / 255).expand(3, -1, -1)
    for name in ("cat/a.npy", "cat/b.pt", "cat/deeper/c.npy", "dog/d.ppm", "dog/f.ppm"):
        assert torch.allclose(load_image(tmp_path / name), expected, atol=1e-6), name
    for name in ("dog/e.pgm", "dog/g.pgm"):
        assert torch.allclose(load_image(tmp_path / name), expected_grey, atol=1e-6), name

    ds = ImageFolder(tmp_path, image_size=8)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.targets == [0, 0, 0, 1, 1, 1, 1] and len(ds) == 7
    names = ["a.npy", "b.pt", "c.npy", "d.ppm", "e.pgm", "f.ppm", "g.pgm"]
    assert [p.name for p, _ in ds.samples] == names
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == ds.targets[i]
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.allclose(ds[0][0], ds[3][0], atol=1e-6)  # same pixels, other format

    same_size = ImageFolder(tmp_path / "dog", image_size=6)  # flat: one class, no resize
    assert same_size.targets == [0, 0, 0, 0]


def test_image_folder_16_bit_and_constant_resize(tmp_path: Path) -> None:
    body = struct.pack(">6H", 65535, 0, 32768, 65535, 0, 32768)
    (tmp_path / "x.ppm").write_bytes(b"P6 2 1 65535\n" + body)
    img = load_image(tmp_path / "x.ppm")
    assert img.shape == (3, 1, 2)
    assert torch.allclose(img[:, 0, 0], torch.tensor([1.0, 0.0, 32768 / 65535]))
    np.save(tmp_path / "flat.npy", np.full((10, 7, 3), 51, dtype=np.uint8))
    ds = ImageFolder(tmp_path, image_size=4)
    x, y = ds[0]
    assert y == 0 and torch.allclose(x, torch.full((3, 4, 4), 0.2), atol=1e-6)


def test_image_folder_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "b").mkdir()
    np.save(tmp_path / "tree" / "a" / "x.npy", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tree" / "b")):
        ImageFolder(tmp_path / "tree")
    (tmp_path / "bad.pnm").write_bytes(b"P6 4 4 255\n" + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        load_image(tmp_path / "bad.pnm")


@pytest.mark.skipif(HAS_PIL, reason="Pillow is installed: .png files are readable")
def test_image_folder_png_only_without_pil(tmp_path: Path) -> None:
    folder = tmp_path / "pngs"
    (folder / "cls").mkdir(parents=True)
    for k in range(2):
        _write_png(folder / "cls" / f"{k}.png", np.full((4, 4, 3), 10 * k, dtype=np.uint8))
    with pytest.raises(RuntimeError, match="pip install pillow") as e:
        ImageFolder(folder)
    msg = str(e.value)
    assert str(folder / "cls") in msg and ".npy" in msg and ".ppm" in msg
    # a folder with readable files too: the .png ones are skipped, with a warning
    np.save(folder / "cls" / "z.npy", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.warns(UserWarning, match="Pillow"):
        ds = ImageFolder(folder)
    assert [p.name for p, _ in ds.samples] == ["z.npy"]


@pytest.mark.skipif(not HAS_PIL, reason="needs Pillow")
def test_image_folder_png_with_pil(tmp_path: Path) -> None:
    rgb = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    _write_png(tmp_path / "a.png", rgb)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.allclose(load_image(tmp_path / "a.png"), expected)
