"""Prepared data -> Ray Data. Training reads Parquet shards through Ray Data; the PNG
bytes are decoded in Ray Data tasks, and each Train worker gets its own split via
``ray.train.get_dataset_shard("train")``. Augmentation runs later, on the worker's
device (aigc_ray.data.augment), and never during evaluation.
"""

from __future__ import annotations

import os

import numpy as np

from aigc_ray import storage
from aigc_ray.config import DataConfig
from aigc_ray.data.prepare import MANIFEST, PrepareError, prepare, read_manifest, shard_files


def prepared_dir(data: DataConfig, seed: int) -> str:
    """Where the prepared copy of a source lives: the parquet: path itself if it was
    written by `aigc-ray prepare`, else a cache under data_root keyed by the settings.
    Either may be a local (shared) path or an s3:// / gs:// / file:// URI, so a dataset
    prepared once is read by every node."""
    if data.dataset.startswith("parquet:"):
        path = data.dataset[len("parquet:"):]
        path = path if storage.is_uri(path) else os.path.expanduser(path)
        if storage.exists(storage.join(path, MANIFEST)):
            return path
    name = data.dataset.replace("folder:", "folder-").replace("parquet:", "parquet-")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")[-80:]
    suffix = f"-n{data.num_shapes}-s{seed}" if data.dataset == "shapes" else ""
    root = data.data_root if storage.is_uri(data.data_root) else os.path.expanduser(data.data_root)
    return storage.join(root, "prepared", f"{name}-{data.image_size}px-{data.channels}ch{suffix}")


def ensure_prepared(data: DataConfig, seed: int) -> str:
    """Prepare the dataset once (cached), and check it matches the config."""
    path = prepared_dir(data, seed)
    if not storage.exists(storage.join(path, MANIFEST)):
        try:
            prepare(data.dataset, path, image_size=data.image_size, channels=data.channels,
                    data_root=data.data_root, download=data.download, num_shapes=data.num_shapes, seed=seed)
        except PrepareError:
            if not storage.exists(storage.join(path, MANIFEST)):  # not a concurrent prepare that finished first
                raise
    manifest = read_manifest(path)
    if (manifest["image_size"], manifest["channels"]) != (data.image_size, data.channels):
        raise PrepareError(f"{path} holds {manifest['image_size']}px x {manifest['channels']}ch images but the "
                           f"config asks for {data.image_size}px x {data.channels}ch")
    return str(path)


def decode_png_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"image": PNG bytes (n,), "label": (n,)} -> {"image": uint8 (n, C, S, S), "label": int64 (n,)}."""
    import torch

    from aigc_ray.images import decode_png

    images = [decode_png(b) for b in batch["image"]]
    return {"image": torch.stack(images).numpy(), "label": batch["label"].astype(np.int64)}


def train_dataset(prepared: str, split: str = "train"):
    import ray.data

    files = shard_files(prepared, split)
    # Ray 2.60's default Parquet reader (DataContext.use_datasource_v2) lists files by reading their
    # footers on a pool of 32 FooterReader actors, started afresh for every execution, i.e. every
    # epoch: on 2 cores an epoch of 1,413 digits took 15 s, 12 of them starting that pool. The V1
    # reader reads our few shards' footers in the caller and streams the same epoch in 0.5-0.9 s.
    context = ray.data.DataContext.get_current()
    default_reader, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        dataset = ray.data.read_parquet(files, columns=["image", "label"])
    finally:
        context.use_datasource_v2 = default_reader
    return dataset.map_batches(decode_png_batch, batch_format="numpy", batch_size=512)


def load_split(prepared: str, split: str, limit: int | None = None):
    """Decode a split without Ray: (uint8 (N, C, S, S) tensor, int64 (N,) labels). For eval."""
    import pyarrow.parquet as pq
    import torch

    tables = [pq.read_table(f, columns=["image", "label"]) for f in shard_files(prepared, split)]
    images, labels = [], []
    for table in tables:
        decoded = decode_png_batch({"image": np.array(table.column("image").to_pylist(), dtype=object),
                                    "label": table.column("label").to_numpy()})
        images.append(decoded["image"])
        labels.append(decoded["label"])
        if limit and sum(len(i) for i in images) >= limit:
            break
    x, y = torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    return (x[:limit], y[:limit]) if limit else (x, y)
