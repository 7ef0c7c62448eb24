"""Data for training and evaluation: Fashion-MNIST (IDX files) and ImageFolder trees.

Evaluation always goes through `model.preprocess.preprocess`, the function the service calls too.
Training augmentation is seeded per (seed, epoch, index), so a run is repeatable and resumable
whatever the number of processes or loader workers.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .config import Preprocessing
from .preprocess import RESAMPLE, decode_image, normalize, preprocess, to_model_mode

log = logging.getLogger(__name__)

# Debian's `dataset-fashion-mnist` location; `VITAE_FASHION_MNIST_DIR` moves it (read at call time, everywhere).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "VITAE_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 <dtype> <ndim>, big-endian dims, data."""
    path = Path(path)
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims}, file holds {data.size} values")
    return data.reshape(dims)


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST IDX files are looked for: `$VITAE_FASHION_MNIST_DIR`, else Debian's location."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of the official train (60k) or test (10k) split."""
    root = Path(root) if root is not None else fashion_mnist_dir()
    out = []
    for stem in FASHION_MNIST_FILES[split]:
        candidates = [root / f"{stem}.gz", root / stem]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}(.gz) not found in {root}; "
                "install it with `apt-get install -y dataset-fashion-mnist`, "
                f"pass --data-dir or set {FASHION_MNIST_ENV}"
            )
        out.append(read_idx(found))
    images, labels = out
    return images, labels.astype(np.int64)


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def augment_tensor(x: np.ndarray, rng: np.random.Generator, pad: int, fill: np.ndarray, erase_p: float) -> np.ndarray:
    """Random crop after padding with the background value, horizontal flip, random erasing. x: (C, S, S)."""
    C, S, _ = x.shape
    padded = np.broadcast_to(fill[:, None, None], (C, S + 2 * pad, S + 2 * pad)).copy()  # (C, S+2p, S+2p)
    padded[:, pad : pad + S, pad : pad + S] = x
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    out = padded[:, top : top + S, left : left + S]
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    out = np.ascontiguousarray(out)
    if rng.random() < erase_p:
        area = rng.uniform(0.02, 0.25) * S * S
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
        h = min(S, max(1, round(math.sqrt(area * aspect))))
        w = min(S, max(1, round(math.sqrt(area / aspect))))
        y, x0 = rng.integers(0, S - h + 1), rng.integers(0, S - w + 1)
        out[:, y : y + h, x0 : x0 + w] = rng.standard_normal((C, h, w)).astype(np.float32)
    return out


class ArrayImageDataset(Dataset):
    """In-memory images (Fashion-MNIST): evaluation-preprocessed once, augmented per sample when training."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        prep: Preprocessing,
        *,
        train: bool,
        seed: int = 0,
        erase_p: float = 0.25,
    ):
        self.labels = torch.from_numpy(labels)
        self.inputs = np.stack([preprocess(Image.fromarray(img), prep) for img in images])  # (N, C, S, S)
        self.train = train
        self.seed = seed
        self.erase_p = erase_p
        self.epoch = 0
        # Background (pixel 0) after normalisation: what padding and borders should look like.
        self.fill = normalize(np.zeros((1, 1, prep.in_chans), dtype=np.uint8), prep)[:, 0, 0]
        self.pad = max(1, prep.img_size // 8)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inputs[index]
        if self.train:
            x = augment_tensor(x, _rng(self.seed, self.epoch, index), self.pad, self.fill, erase_p=self.erase_p)
        return torch.from_numpy(x), self.labels[index]


def random_resized_crop(
    image: Image.Image, prep: Preprocessing, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0)
) -> Image.Image:
    """Inception-style crop: random area and aspect ratio, resized to img_size; center crop as fallback."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            break
    else:
        w = h = min(width, height)
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize(
        (prep.img_size, prep.img_size), RESAMPLE[prep.interpolation], box=(left, top, left + w, top + h)
    )


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` files. A file that fails to decode is reported once and skipped."""

    def __init__(
        self, root: str | Path, prep: Preprocessing, *, train: bool, seed: int = 0, class_names: list[str] | None = None
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        self.classes = class_names or sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{root} has no class folders (expected {root}/<class>/<image>)")
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise ValueError(f"{root} has no images with suffixes {sorted(IMAGE_SUFFIXES)}")
        self.prep = prep
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        path, label = self.samples[index]
        try:
            image = decode_image(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            return None
        if self.train:
            rng = _rng(self.seed, self.epoch, index)
            image = random_resized_crop(to_model_mode(image, self.prep.in_chans), self.prep, rng)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            x = normalize(np.asarray(image), self.prep)
        else:
            x = preprocess(image, self.prep)
        return torch.from_numpy(x), torch.tensor(label)


def collate_skipping_none(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Default collation, minus the samples that failed to load."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    xs, ys = zip(*batch, strict=True)
    return torch.stack(xs), torch.stack(ys)


def build_datasets(
    data: str,
    prep: Preprocessing,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    val_subset: int | None = None,
    train: bool = True,
    holdout: int = 0,
    erase_p: float = 0.25,
) -> tuple[Dataset | None, Dataset, list[str]]:
    """(train, val, class names) for `fashion-mnist` or an ImageFolder root with train/ and val/.

    With `holdout` N > 0 the validation set is N images of the training split, never augmented and
    never trained on (Fashion-MNIST: the last N; ImageFolder: a fixed random draw), and the test/val
    split is not loaded: choices made during training leave the test set for one final measurement.
    `erase_p` is the random-erasing probability of the Fashion-MNIST training augmentation.
    """
    if holdout < 0:
        raise ValueError(f"holdout must be 0 (use the test/val split) or a positive image count, got {holdout}")
    if data == "fashion-mnist":
        root = Path(data_dir) if data_dir else fashion_mnist_dir()
        train_ds, val_ds = _fashion_mnist_datasets(root, prep, seed, train, holdout, erase_p, train_subset, val_subset)
        return train_ds, val_ds, list(FASHION_MNIST_CLASSES)
    train_ds, val_ds = _image_folder_datasets(Path(data_dir or data), prep, seed, train, holdout)
    for ds, n in ((train_ds, train_subset), (val_ds, val_subset)):
        if ds is not None and n:
            ds.samples = ds.samples[:n]
    return train_ds, val_ds, val_ds.classes


def _fashion_mnist_datasets(
    root: Path,
    prep: Preprocessing,
    seed: int,
    train: bool,
    holdout: int,
    erase_p: float,
    train_subset: int | None,
    val_subset: int | None,
) -> tuple[Dataset | None, Dataset]:
    """Fashion-MNIST's (train, val): the held-out images are the training split's last `holdout`."""
    train_ds = None
    if train or holdout:
        images, labels = load_fashion_mnist(root, "train")
        kept = len(images) - holdout
        if kept <= 0:
            raise ValueError(f"holdout {holdout} leaves no training images (the train split has {len(images)})")
        if train:
            train_images, train_labels = images[:kept][:train_subset], labels[:kept][:train_subset]
            train_ds = ArrayImageDataset(train_images, train_labels, prep, train=True, seed=seed, erase_p=erase_p)
    if holdout:
        val_images, val_labels = images[kept:], labels[kept:]
    else:
        val_images, val_labels = load_fashion_mnist(root, "test")
    return train_ds, ArrayImageDataset(val_images[:val_subset], val_labels[:val_subset], prep, train=False)


def _image_folder_datasets(
    root: Path, prep: Preprocessing, seed: int, train: bool, holdout: int
) -> tuple[Dataset | None, Dataset]:
    """An ImageFolder root's (train, val): val/ (or test/), or a fixed random draw of `holdout` training images."""
    train_root = root / "train"
    if not holdout:
        val_root = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if val_root is None:
            raise FileNotFoundError(f"{root} needs a val/ (or test/) folder of class folders")
        train_ds = ImageFolderDataset(train_root, prep, train=True, seed=seed) if train else None
        classes = train_ds.classes if train_ds is not None else None
        return train_ds, ImageFolderDataset(val_root, prep, train=False, class_names=classes)
    # Files are sorted by class, so the held-out images are a fixed random draw (balanced in expectation).
    val_ds = ImageFolderDataset(train_root, prep, train=False)
    if holdout >= len(val_ds.samples):
        raise ValueError(f"holdout {holdout} leaves no training images ({train_root} has {len(val_ds.samples)})")
    held = set(np.random.default_rng(0).permutation(len(val_ds.samples))[:holdout].tolist())
    train_ds = None
    if train:
        train_ds = ImageFolderDataset(train_root, prep, train=True, seed=seed, class_names=val_ds.classes)
        train_ds.samples = [s for i, s in enumerate(train_ds.samples) if i not in held]
    val_ds.samples = [s for i, s in enumerate(val_ds.samples) if i in held]
    return train_ds, val_ds
