"""DINO's data side: images, the multi-crop augmentation, and a resumable sampler.

After ``facebookresearch/dino`` (``main_dino.py``: ``DataAugmentationDINO``), written with
torch ops only: no torchvision, no PIL (PIL is used for ``.png``/``.jpg``/... only when it
happens to be importable).

Invariants, which are what makes a resumed run see the samples and crops the straight one
would have seen:

* :class:`SyntheticImages`: sample ``i`` is a function of ``(seed, i)`` only.
* :class:`MultiCropDataset`: the crops of sample ``i`` in epoch ``e`` are a function of
  ``(seed, e, i)`` and of the base sample only, so the same whichever rank, world size or
  DataLoader worker loads them.
* :class:`ResumableDistributedSampler`: the samples of global step ``s`` of epoch ``e`` are
  ``perm[s*B:(s+1)*B]`` with ``perm = torch.randperm(n, seed + e)`` (the permutation of
  ``DistributedSampler``), whatever the world size; its position ``(epoch, consumed)`` is
  a pair of plain ints that is saved in a checkpoint and restored under another world size.
* Nothing here draws from (or reseeds) the global RNG: every random number comes from a
  ``torch.Generator`` seeded from the indices above.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NATIVE_EXTENSIONS",
    "PIL_EXTENSIONS",
    "ImageFolder",
    "MultiCropAugmentation",
    "MultiCropDataset",
    "ResumableDistributedSampler",
    "SyntheticImages",
    "load_image",
    "mix_seed",
    "normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` that is a function of ``parts`` (ints, any sign) only.

    SplitMix64 chained over the parts: ``h = 0; for p in parts: h = splitmix64(h ^ p)``
    (``p`` taken modulo 2**64), then the top bit dropped. Neighbouring inputs
    (``i`` and ``i + 1``; ``(seed, epoch)`` and ``(seed + 1, epoch - 1)``) give unrelated
    seeds, unlike a linear combination. Stable across Python runs (no ``hash()``, which is
    salted for strings).
    """
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


# Domain tags, so that the streams of the different users of mix_seed never coincide.
_TAG_PROTOTYPE = 0x5052_4F54  # "PROT"
_TAG_SAMPLE = 0x5341_4D50  # "SAMP"
_TAG_CROPS = 0x4352_4F50  # "CROP"


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet's mean and std, per channel, of ``[3, H, W]`` or ``[N, 3, H, W]`` in [0, 1]."""
    return (images - _MEAN) / _STD


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """``[C,H,W]`` float -> ``[C,size,size]``, bilinear with antialiasing, in [0, 1]."""
    if img.shape[-2:] == (size, size):
        return img
    out = F.interpolate(
        img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )[0]
    return out.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- synthetic data


class SyntheticImages(Dataset):
    """A labelled image set generated on the fly, for runs without a data set on disk.

    Class ``c`` has a smooth prototype: a ``3x4x4`` uniform tensor drawn from a generator
    seeded by ``(seed, c)``, upsampled bilinearly to ``image_size``. Sample ``i`` has class
    ``i % num_classes`` and is its prototype rolled by a random shift of up to a quarter of
    the side, scaled per channel by a factor in ``[0.7, 1.3]``, plus gaussian noise of
    standard deviation 0.05, clamped to ``[0, 1]``; its random numbers come from a generator
    seeded by ``(seed, i)``.

    Invariant: ``self[i]`` is a function of ``(seed, i)`` only (bitwise, on one machine) and
    does not touch the global RNG. ``self[i]`` is ``(float32 [3, H, W] in [0, 1], int)``.
    """

    def __init__(
        self, num_samples: int, image_size: int = 32, num_classes: int = 8, seed: int = 0
    ) -> None:
        if num_samples <= 0 or image_size <= 0 or num_classes <= 0:
            raise ValueError(
                f"SyntheticImages needs positive sizes, got num_samples={num_samples}, "
                f"image_size={image_size}, num_classes={num_classes}"
            )
        self.num_samples, self.image_size = num_samples, image_size
        self.num_classes, self.seed = num_classes, seed
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.targets: list[int] = [i % num_classes for i in range(num_samples)]
        protos = []
        for c in range(num_classes):
            small = torch.rand(1, 3, 4, 4, generator=_generator(_TAG_PROTOTYPE, seed, c))
            protos.append(
                F.interpolate(
                    small, size=(image_size, image_size), mode="bilinear", align_corners=False
                )[0]
            )
        self.prototypes = torch.stack(protos)  # [num_classes, 3, H, W]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        i %= self.num_samples
        label = self.targets[i]
        g = _generator(_TAG_SAMPLE, self.seed, i)
        s = self.image_size
        m = s // 4
        dy, dx = torch.randint(-m, m + 1, (2,), generator=g).tolist()
        img = torch.roll(self.prototypes[label], shifts=(dy, dx), dims=(1, 2))
        scale = 0.7 + 0.6 * torch.rand(3, 1, 1, generator=g)
        noise = 0.05 * torch.randn(3, s, s, generator=g)
        return (img * scale + noise).clamp_(0.0, 1.0), label


# --------------------------------------------------------------------------- image folder

NATIVE_EXTENSIONS = (".npy", ".pt", ".ppm", ".pgm", ".pnm")
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_PNM_WHITESPACE = b" \t\r\n\x0b\x0c"


def _pil_available() -> bool:
    try:
        importlib.import_module("PIL.Image")
    except ImportError:
        return False
    return True


def _pnm_tokens(buf: bytes, count: int, pos: int = 0) -> tuple[list[bytes], int]:
    """The next ``count`` header tokens of a PNM file, skipping whitespace and ``#``
    comments; returns them and the position just after the last one."""
    tokens: list[bytes] = []
    n = len(buf)
    while len(tokens) < count:
        while pos < n and buf[pos] in _PNM_WHITESPACE:
            pos += 1
        if pos >= n:
            raise ValueError("truncated PNM header")
        if buf[pos] == ord("#"):
            while pos < n and buf[pos] not in b"\r\n":
                pos += 1
            continue
        start = pos
        while pos < n and buf[pos] not in _PNM_WHITESPACE and buf[pos] != ord("#"):
            pos += 1
        tokens.append(buf[start:pos])
    return tokens, pos


def _read_pnm(path: Path) -> torch.Tensor:
    """A binary or ASCII PPM/PGM (P6, P5, P3, P2) as float ``[C, H, W]`` in [0, 1]."""
    buf = path.read_bytes()
    magic = buf[:2]
    if magic not in (b"P6", b"P5", b"P3", b"P2"):
        raise ValueError(f"{path}: not a P6/P5/P3/P2 PPM/PGM file (magic {magic!r})")
    (w_tok, h_tok, max_tok), pos = _pnm_tokens(buf, 3, 2)
    try:
        width, height, maxval = int(w_tok), int(h_tok), int(max_tok)
    except ValueError as e:
        raise ValueError(f"{path}: bad PNM header: {e}") from None
    if width <= 0 or height <= 0 or not 0 < maxval < 65536:
        raise ValueError(f"{path}: bad PNM header: {width}x{height}, maxval {maxval}")
    channels = 3 if magic in (b"P6", b"P3") else 1
    count = width * height * channels
    if magic in (b"P6", b"P5"):
        pos += 1  # exactly one whitespace byte separates maxval from the raster
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        raw = buf[pos : pos + count * dtype.itemsize]
        if len(raw) < count * dtype.itemsize:
            raise ValueError(f"{path}: truncated raster ({len(raw)} bytes for {count} samples)")
        data = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    else:
        body = re.sub(rb"#[^\r\n]*", b" ", buf[pos:]).split()
        if len(body) < count:
            raise ValueError(f"{path}: truncated raster ({len(body)} of {count} samples)")
        data = np.asarray([int(t) for t in body[:count]], dtype=np.float32)
    arr = data.reshape(height, width, channels) / float(maxval)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).clamp_(0.0, 1.0)


def _to_chw_float(t: torch.Tensor, channels_last: bool, path: Path) -> torch.Tensor:
    """An image array as float ``[C, H, W]`` in [0, 1]; ``channels_last`` is the layout
    assumed for a 3-d array whose layout its shape does not settle."""
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 3:
        first, last = t.shape[0] in (1, 3, 4), t.shape[-1] in (1, 3, 4)
        if (channels_last and last) or (last and not first):
            t = t.permute(2, 0, 1)
        elif not first:
            raise ValueError(f"{path}: cannot tell the channel axis of shape {tuple(t.shape)}")
    else:
        raise ValueError(f"{path}: expected an image of 2 or 3 dims, got {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.dtype == torch.bool:
        t = t.float()
    elif not t.is_floating_point():
        info = torch.iinfo(t.dtype)
        t = t.double() / float(info.max)
    return t.float().clamp(0.0, 1.0).contiguous()


def _to_rgb(t: torch.Tensor, path: Path) -> torch.Tensor:
    c = t.shape[0]
    if c == 1:
        return t.expand(3, -1, -1).contiguous()
    if c == 3:
        return t
    if c == 4:
        return t[:3].contiguous()  # RGBA: alpha dropped
    raise ValueError(f"{path}: {c} channels, expected 1, 3 or 4")


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """One image file as float ``[3, H, W]`` in [0, 1] (grey repeated on 3 channels).

    Readable without dependencies: ``.npy`` (``HxW``, ``HxWxC`` uint8, or ``CxHxW`` float;
    integer arrays are scaled by their dtype's maximum, float ones taken as [0, 1]),
    ``.pt`` (a tensor saved with ``torch.save``, ``CxHxW`` or ``HxW``; same scaling), and
    PPM/PGM (``.ppm``, ``.pgm``, ``.pnm``: P6, P5, P3, P2, 8 or 16 bits). With Pillow
    installed, also ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext == ".npy":
        arr = np.load(p, allow_pickle=False)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        # uint8 arrays follow the image convention HxWxC, float ones torch's CxHxW
        img = _to_chw_float(t, channels_last=arr.dtype == np.uint8, path=p)
    elif ext == ".pt":
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"{p}: expected a tensor, got {type(obj).__name__}")
        img = _to_chw_float(obj.detach(), channels_last=False, path=p)
    elif ext in (".ppm", ".pgm", ".pnm"):
        img = _read_pnm(p)
    elif ext in PIL_EXTENSIONS:
        if not _pil_available():
            raise RuntimeError(
                f"{p}: reading {ext} needs Pillow (`pip install pillow`); without it the "
                f"readable formats are {', '.join(NATIVE_EXTENSIONS)}"
            )
        image_mod: Any = importlib.import_module("PIL.Image")
        with image_mod.open(p) as im:
            arr = np.asarray(im.convert("RGB"))
        img = _to_chw_float(torch.from_numpy(arr.copy()), channels_last=True, path=p)
    else:
        raise ValueError(f"{p}: unsupported image format {ext!r}")
    return _to_rgb(img, p)


class ImageFolder(Dataset):
    """Images on disk, labelled by sub-folder, the convention of torchvision's
    ``ImageFolder``: ``root/<class>/**/<file>``, classes sorted by name, class index = rank
    in that order, files sorted within a class (sub-folders searched recursively). A
    ``root`` without sub-folders is one flat class: every file has label 0.

    Formats: see :func:`load_image`. Files with other extensions are ignored. A folder
    whose only images need Pillow, when Pillow is absent, raises ``RuntimeError`` naming
    the folder; an empty folder raises ``FileNotFoundError`` naming it.

    ``self[i]`` is ``(float32 [3, image_size, image_size] in [0, 1], int)``, read from disk
    on each call (bilinear resize with antialiasing); it is a function of the file only.
    Attributes: ``classes``, ``class_to_idx``, ``samples`` (``(path, label)`` pairs),
    ``targets``.
    """

    def __init__(self, root: str | os.PathLike[str], image_size: int = 32) -> None:
        self.root, self.image_size = Path(root), image_size
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a directory")
        subdirs = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        self.pil = _pil_available()
        if subdirs:
            self.classes = subdirs
            folders = [self.root / c for c in subdirs]
        else:
            self.classes = [self.root.name or "root"]
            folders = [self.root]
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            files = self._files(folder, recursive=bool(subdirs))
            self.samples.extend((f, label) for f in files)
        self.targets: list[int] = [label for _, label in self.samples]

    def _files(self, folder: Path, recursive: bool) -> list[Path]:
        if recursive:
            found = [
                Path(d) / f
                for d, dirs, files in sorted(os.walk(folder, followlinks=True))
                for f in sorted(files)
            ]
        else:
            found = sorted(p for p in folder.iterdir() if p.is_file())
        native = [p for p in found if p.suffix.lower() in NATIVE_EXTENSIONS]
        pil = [p for p in found if p.suffix.lower() in PIL_EXTENSIONS]
        if self.pil and (native or pil):
            return sorted(native + pil)
        if pil and not native:
            raise RuntimeError(
                f"ImageFolder: folder {folder} holds only images that need Pillow "
                f"({', '.join(sorted({p.suffix.lower() for p in pil}))}: {len(pil)} files), "
                f"which is not installed. Readable without it: "
                f"{', '.join(NATIVE_EXTENSIONS)}; `pip install pillow` adds "
                f"{', '.join(PIL_EXTENSIONS)}."
            )
        if pil:
            warnings.warn(
                f"ImageFolder: {len(pil)} files in {folder} need Pillow (not installed) and "
                "are skipped; `pip install pillow` reads them",
                stacklevel=3,
            )
        if not native:
            raise FileNotFoundError(
                f"ImageFolder: no image file in {folder} (readable: "
                f"{', '.join(NATIVE_EXTENSIONS + PIL_EXTENSIONS)})"
            )
        return native

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return _resize(load_image(path), self.image_size), label


# --------------------------------------------------------------------------- augmentation


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(g)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision's ``rgb_to_grayscale``: ``[1, H, W]``."""
    r, g, b = img.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(a: torch.Tensor, b: torch.Tensor | float, ratio: float) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _rgb2hsv(img: torch.Tensor) -> torch.Tensor:
    # torchvision.transforms.functional_tensor._rgb2hsv (BSD-3-Clause)
    r, g, b = img.unbind(-3)
    maxc = img.max(dim=-3).values
    minc = img.min(dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv2rgb(img: torch.Tensor) -> torch.Tensor:
    # torchvision.transforms.functional_tensor._hsv2rgb (BSD-3-Clause)
    h, s, v = img.unbind(-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(-3) == torch.arange(6).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)
    return torch.einsum("...ijk,...xijk->...xjk", mask.to(img.dtype), a4)


def _adjust_hue(img: torch.Tensor, factor: float) -> torch.Tensor:
    hsv = _rgb2hsv(img)
    h = torch.remainder(hsv[0] + factor, 1.0)
    return _hsv2rgb(torch.stack((h, hsv[1], hsv[2]))).clamp(0.0, 1.0)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of ``[C, H, W]``, kernel about 10% of the side (odd, >= 3),
    reflect padding (as torchvision's ``GaussianBlur``)."""
    size = min(img.shape[-2:])
    k = max(3, int(0.1 * size) // 2 * 2 + 1)
    half = k // 2
    x = torch.arange(k, dtype=img.dtype) - half
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = img.shape[0]
    out = F.pad(img[None], (half, half, half, half), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return out[0]


class MultiCropAugmentation:
    """DINO's multi-crop augmentation (``DataAugmentationDINO``) in torch ops.

    ``aug(image, generator)`` returns ``2 + local_crops_number`` float32 tensors: two global
    crops ``[3, global_size, global_size]`` then the local crops
    ``[3, local_size, local_size]``, normalised with the ImageNet mean and std. Per crop:

    1. random resized crop (torchvision's algorithm: 10 tries of an area fraction uniform in
       the crop's ``scale`` and a log-uniform aspect ratio in (3/4, 4/3), else the central
       crop), resized bilinearly with antialiasing (DINO resizes bicubically);
    2. horizontal flip, p = 0.5;
    3. colour jitter, p = 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1
       (DINO's values), applied in a random order as torchvision's ``ColorJitter``;
    4. grayscale, p = 0.2;
    5. gaussian blur, sigma uniform in (0.1, 2.0): p = 1.0 on global crop 1, 0.1 on global
       crop 2, 0.5 on the local crops;
    6. solarisation (``x -> 1 - x`` where ``x >= 0.5``), p = 0.2, global crop 2 only;
    7. ImageNet normalisation.

    Invariant: every random number comes from ``generator``, so the crops are a function of
    the image and of the generator's state only; the global RNG is never drawn from.
    """

    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 4,
        global_size: int = 32,
        local_size: int = 16,
        *,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
    ) -> None:
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_size, self.local_size = global_size, local_size
        self.brightness, self.contrast = brightness, contrast
        self.saturation, self.hue = saturation, hue

    @property
    def num_crops(self) -> int:
        return 2 + self.local_crops_number

    def crop_params(
        self, height: int, width: int, scale: Sequence[float], g: torch.Generator
    ) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a random resized crop, torchvision's ``get_params``."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(g, scale[0], scale[1])
            aspect = math.exp(_uniform(g, log_lo, log_hi))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def color_jitter(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """torchvision's ``ColorJitter``: factors drawn, then applied in a random order."""
        order = torch.randperm(4, generator=g).tolist()
        b = _uniform(g, max(0.0, 1 - self.brightness), 1 + self.brightness)
        c = _uniform(g, max(0.0, 1 - self.contrast), 1 + self.contrast)
        s = _uniform(g, max(0.0, 1 - self.saturation), 1 + self.saturation)
        h = _uniform(g, -self.hue, self.hue)
        for fn in order:
            if fn == 0 and self.brightness > 0:
                img = _blend(img, 0.0, b)
            elif fn == 1 and self.contrast > 0:
                img = _blend(img, _grayscale(img).mean(), c)
            elif fn == 2 and self.saturation > 0:
                img = _blend(img, _grayscale(img), s)
            elif fn == 3 and self.hue > 0:
                img = _adjust_hue(img, h)
        return img

    def _crop(
        self,
        image: torch.Tensor,
        g: torch.Generator,
        size: int,
        scale: Sequence[float],
        blur_p: float,
        solarize_p: float,
    ) -> torch.Tensor:
        top, left, h, w = self.crop_params(image.shape[-2], image.shape[-1], scale, g)
        x = image[:, top : top + h, left : left + w]
        x = F.interpolate(
            x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp(0.0, 1.0)
        if _rand(g) < 0.5:
            x = x.flip(-1)
        if _rand(g) < 0.8:
            x = self.color_jitter(x, g)
        if _rand(g) < 0.2:
            x = _grayscale(x).expand(3, -1, -1)
        if _rand(g) < blur_p:
            x = _gaussian_blur(x, _uniform(g, 0.1, 2.0))
        if solarize_p > 0 and _rand(g) < solarize_p:
            x = torch.where(x >= 0.5, 1.0 - x, x)
        return normalize(x).contiguous()

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
        image = image.float()
        g = generator
        crops = [
            self._crop(image, g, self.global_size, self.global_crops_scale, 1.0, 0.0),
            self._crop(image, g, self.global_size, self.global_crops_scale, 0.1, 0.2),
        ]
        for _ in range(self.local_crops_number):
            crops.append(self._crop(image, g, self.local_size, self.local_crops_scale, 0.5, 0.0))
        return crops


class MultiCropDataset(Dataset):
    """A base data set seen through :class:`MultiCropAugmentation`.

    ``self[i]`` is ``(crops, label)``: the crops come from a fresh generator seeded with
    ``mix_seed(CROP_TAG, seed, epoch, i)`` (SplitMix64 over the four ints, see
    :func:`mix_seed`), so the crops of sample ``i`` in epoch ``e`` are the same whichever
    rank, world size or DataLoader worker loads them, and the global RNG is untouched. The
    default collate turns a batch into ``(list of [b, 3, S, S] tensors, labels)``.

    ``set_epoch`` changes what ``self[i]`` returns: call it before the DataLoader's iterator
    is made (``iter(loader)``, i.e. the ``for`` loop); workers hold a copy of this object, so
    with ``persistent_workers=True`` they would not see it.
    """

    def __init__(self, base: Dataset, augment: MultiCropAugmentation, seed: int) -> None:
        self.base, self.augment, self.seed = base, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def targets(self) -> list[int]:
        return list(getattr(self.base, "targets", []))

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def generator(self, i: int) -> torch.Generator:
        """The generator of sample ``i``'s crops in the current epoch (fresh each call)."""
        return _generator(_TAG_CROPS, self.seed, self.epoch, i)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        image, label = self.base[i]
        return self.augment(image, self.generator(i)), int(label)


# --------------------------------------------------------------------------- sampler


class ResumableDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` whose order does not depend on the world size, and whose
    position within an epoch is saved and restored, under the same or another world size.

    With ``W = num_replicas`` and ``B = global_batch_size`` (``b = B // W`` per rank, ``W``
    must divide ``B``), an epoch is ``steps_per_epoch = len(dataset) // B`` global steps
    (``drop_last``: the last ``len(dataset) % B`` samples of the permutation are dropped).
    The samples of global step ``s`` of epoch ``e`` are ``perm[s*B:(s+1)*B]``, where
    ``perm = torch.randperm(len(dataset), generator=manual_seed(seed + e))`` (the
    permutation ``DistributedSampler`` uses; ``arange`` without shuffle). Rank ``r`` yields
    ``perm[r::W]`` cut to the epoch's ``steps_per_epoch * B`` entries, so a DataLoader with
    ``batch_size=b`` gives rank ``r`` the ``r``-th strided share of each global batch, and
    the union over the ranks is the same set for every ``W``.

    Position: ``epoch`` and ``consumed``, the number of samples of the epoch consumed by
    all ranks together (a multiple of ``B``). The training loop calls ``advance()`` after
    each optimizer step; ``__iter__`` starts from ``consumed`` (read when the iterator is
    made, so advancing during the epoch does not disturb a running DataLoader).
    ``set_epoch(e)`` resets ``consumed`` to 0 only if ``e`` is not the current epoch: a
    sampler restored by ``load_state_dict`` in the middle of epoch ``e`` keeps its position
    when the resumed loop calls ``set_epoch(e)``.

    ``state_dict()`` is plain ints (pickled into checkpoints); ``load_state_dict`` refuses
    a state saved with another seed, global batch size or data set size, which would make
    the resumed run silently see other samples.

    ``num_samples`` and ``total_size`` keep ``DistributedSampler``'s meaning for a whole
    epoch (``steps_per_epoch * b`` and ``steps_per_epoch * B``); ``len(self)`` is what this
    rank has left in the epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        global_batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if num_replicas <= 0:
            raise ValueError(f"num_replicas must be positive, got {num_replicas}")
        if global_batch_size <= 0 or global_batch_size % num_replicas != 0:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a positive multiple of "
                f"num_replicas {num_replicas}"
            )
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // num_replicas
        n = len(dataset)  # type: ignore[arg-type]
        if n // self.global_batch_size == 0:
            raise ValueError(
                f"data set of {n} samples is smaller than one global batch of "
                f"{self.global_batch_size}: an epoch would have no step"
            )
        self.dataset_size = n
        self.num_samples = self.steps_per_epoch * self.batch_size
        self.total_size = self.steps_per_epoch * self.global_batch_size
        self.consumed = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch_size

    def permutation(self) -> list[int]:
        """The current epoch's order of the whole data set (all ranks)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(self.dataset_size, generator=g).tolist()
        return list(range(self.dataset_size))

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation()
        return iter(perm[self.consumed + self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return (self.total_size - self.consumed) // self.num_replicas

    def advance(self, steps: int = 1) -> None:
        """Mark ``steps`` global steps (``steps * global_batch_size`` samples) consumed."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        consumed = self.consumed + steps * self.global_batch_size
        if consumed > self.total_size:
            raise ValueError(
                f"advance({steps}) goes past the end of epoch {self.epoch}: step "
                f"{consumed // self.global_batch_size} of {self.steps_per_epoch}"
            )
        self.consumed = consumed

    def set_epoch(self, epoch: int) -> None:
        """Enter ``epoch`` at its start; a no-op if already in it (keeps a resumed position)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": int(self.epoch),
            "consumed": int(self.consumed),
            "seed": int(self.seed),
            "global_batch_size": int(self.global_batch_size),
            "num_samples": int(self.dataset_size),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``epoch`` and ``consumed``; the world size may differ from the saver's."""
        missing = [k for k in self.state_dict() if k not in state_dict]
        if missing:
            raise ValueError(f"sampler state lacks the field(s) {', '.join(missing)}")
        mine = {
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.dataset_size,
        }
        for key, value in mine.items():
            if int(state_dict[key]) != value:
                raise ValueError(
                    f"sampler state has {key}={int(state_dict[key])} but this sampler has "
                    f"{key}={value}: the resumed run would see other samples"
                )
        consumed = int(state_dict["consumed"])
        if consumed % self.global_batch_size != 0 or not 0 <= consumed <= self.total_size:
            raise ValueError(
                f"sampler state has consumed={consumed}, not a multiple of the global batch "
                f"{self.global_batch_size} within the epoch's {self.total_size} samples"
            )
        self.epoch = int(state_dict["epoch"])
        self.consumed = consumed
