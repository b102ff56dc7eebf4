"""The files torchvision keeps for MNIST, Fashion-MNIST and CIFAR-10, read here from their documented
formats rather than through torchvision's dataset classes, both official splits of each.

Why not ``torchvision.datasets.CIFAR10``: it md5-checks every batch (a copy re-packed by another tool, or
any file but the original, is "not found or corrupted", with no way past it offline) and then reads the
batches with a plain ``pickle.load``, which runs whatever code a file names: data read from outside never
runs code here (DESIGN.md, Trust). The batches are read with an unpickler that admits only what the
format holds (dicts, lists, strings, numbers and uint8 numpy arrays). MNIST's idx files are read with
numpy: torchvision's reader checks the header with ``assert`` (gone under ``python -O``) and lets a
truncated file through to a reshape error; here either is a SourceError naming the file. Where the
files lie is torchvision's layout (its class attributes name the files), under either the root given
to torchvision or ``DATA_ROOT/<dataset>/``, where ``--download`` puts them.
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# {split: (images file, labels file)} in MNIST's and FashionMNIST's raw folder (torchvision's MNIST._load_data)
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_UBYTE = 0x08  # idx element type code of unsigned bytes, the only one MNIST's files use
MAX_BATCH_BYTES = 256 * 2**20  # a CIFAR-10 batch is ~30 MB; a file larger than this is not one


class FileFormatError(ValueError):
    """A dataset file is missing or not in its documented format; the message names the file."""


@dataclass
class Split:
    images: np.ndarray
    """uint8 (N, H, W, C)."""
    labels: np.ndarray
    """int64 (N,)."""


@dataclass
class OfficialFiles:
    """A torchvision dataset's official train and test splits, as read from disk."""
    folder: Path
    """The directory the files were read from (for messages)."""
    class_names: list[str]
    train: Split
    test: Split


def idx_folders(root: Path, dataset: str, dataset_class: str) -> list[Path]:
    """Where an MNIST-style dataset may lie, in the order looked at."""
    return [root / dataset_class / "raw", root / dataset / dataset_class / "raw"]


def cifar_folders(root: Path, dataset: str) -> list[Path]:
    from torchvision.datasets import CIFAR10

    return [root / CIFAR10.base_folder, root / dataset / CIFAR10.base_folder]


def cifar_files() -> dict[str, list[str]]:
    """{split: batch file names} and the meta file, as torchvision's CIFAR10 names them."""
    from torchvision.datasets import CIFAR10

    return {"train": [name for name, _ in CIFAR10.train_list], "test": [name for name, _ in CIFAR10.test_list],
            "meta": [CIFAR10.meta["filename"]]}


def _present(path: Path) -> Path | None:
    """The file, or its .gz (torchvision's download keeps both; a copy may hold only the archive)."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes with ``ndim`` dimensions (http://yann.lecun.com/exdb/mnist/): a 4-byte
    magic (0, 0, type 0x08, ndim), ndim big-endian uint32 sizes, then the bytes. Plain or gzip-compressed;
    a compressed one is read no further than its header says (a gzip bomb costs nothing)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 or header[:2] != b"\0\0" or header[2] != IDX_UBYTE or header[3] != ndim:
                raise FileFormatError(f"{path} is not an idx file of {ndim}-d unsigned bytes "
                                      f"(magic {header[:4].hex() or 'missing'}, expected 000008{ndim:02x})")
            if len(header) < 4 + 4 * ndim:
                raise FileFormatError(f"{path}: the idx header is cut short")
            shape = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
            expected = int(np.prod(shape))
            body = f.read(expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise FileFormatError(f"{path} can't be read: {err}") from None
    if len(body) != expected:
        raise FileFormatError(f"{path}: the header says {'x'.join(map(str, shape))} = {expected} bytes, "
                              f"the file holds {'more' if len(body) > expected else len(body)}")
    return np.frombuffer(bytearray(body), np.uint8).reshape(shape)  # writable: torch.from_numpy warns otherwise


def read_idx_split(folder: Path, images_name: str, labels_name: str) -> Split:
    images, labels = read_idx(_present(folder / images_name), 3), read_idx(_present(folder / labels_name), 1)
    if len(images) != len(labels):
        raise FileFormatError(f"{folder}: {images_name} holds {len(images)} images but {labels_name} "
                              f"{len(labels)} labels")
    return Split(images[..., None], labels.astype(np.int64))


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch is made of: builtins and numpy arrays; any other global a file
    names (os.system, a class of ours, ...) is refused before it is looked up, so nothing runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct (moved in numpy 2)
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # how Python 3's protocol 2 writes bytes
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"names {module}.{name}, which a CIFAR batch never holds")


def _unpickle(path: Path) -> dict:
    if path.stat().st_size > MAX_BATCH_BYTES:
        raise FileFormatError(f"{path} is {path.stat().st_size} bytes, more than a CIFAR batch ever is")
    try:
        entry = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 (a damaged pickle raises almost anything; all mean the same)
        raise FileFormatError(f"{path} is not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if not isinstance(entry, dict):
        raise FileFormatError(f"{path} is not a CIFAR-10 python batch (holds a {type(entry).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_cifar_batch(path: Path) -> Split:
    """A cifar-10-batches-py file: {"data": uint8 (N, 3072) rows of R, G, B planes of 32x32, "labels": [N]}."""
    entry = _unpickle(path)
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
        shape = getattr(data, "shape", None)
        raise FileFormatError(f"{path}: 'data' is not a uint8 array of N x 3072 (got {type(data).__name__} {shape})")
    if not (isinstance(labels, list) and len(labels) == len(data) and all(isinstance(v, int) for v in labels)):
        raise FileFormatError(f"{path}: 'labels' is not a list of {len(data)} integers")
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, np.int64))


def read_cifar_meta(path: Path) -> list[str]:
    names = _unpickle(path).get("label_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str | bytes) for n in names)):
        raise FileFormatError(f"{path}: 'label_names' is not a list of class names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def missing_files(dataset_class: str, folder: Path) -> list[str]:
    """The files of the layout that are not in ``folder`` (a .gz counts for an idx file)."""
    if dataset_class == "CIFAR10":
        names = [n for names in cifar_files().values() for n in names]
        return [n for n in names if not (folder / n).is_file()]
    names = [n for pair in IDX_FILES.values() for n in pair]
    return [n for n in names if _present(folder / n) is None]


def read_official(dataset: str, dataset_class: str, root: Path) -> OfficialFiles | None:
    """Both official splits from the first folder that holds all the files; None when none does."""
    folders = cifar_folders(root, dataset) if dataset_class == "CIFAR10" else idx_folders(root, dataset, dataset_class)
    folder = next((f for f in folders if not missing_files(dataset_class, f)), None)
    if folder is None:
        return None
    if dataset_class == "CIFAR10":
        names = cifar_files()
        splits = {s: _concat([read_cifar_batch(folder / n) for n in names[s]]) for s in ("train", "test")}
        class_names = read_cifar_meta(folder / names["meta"][0])
    else:
        import torchvision.datasets

        splits = {s: read_idx_split(folder, *pair) for s, pair in IDX_FILES.items()}
        class_names = list(getattr(torchvision.datasets, dataset_class).classes)
    for s, split in splits.items():
        if len(split.labels) and not 0 <= split.labels.min() <= split.labels.max() < len(class_names):
            raise FileFormatError(f"{folder}: a {s} label is outside 0..{len(class_names) - 1}")
    return OfficialFiles(folder, class_names, splits["train"], splits["test"])
