"""Hostile Parquet: nothing in a file someone else wrote runs code, and every bad column type
is a clear error naming the column. The pickled-object file is built here, with Ray Data's
own extension type (registered by importing ray.data, as `aigc-ray train` does)."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import encode_png

from aigc_ray.data.pipeline import load_split
from aigc_ray.data.prepare import prepare
from aigc_ray.data.schema import SchemaError
from aigc_ray.data.sources import SourceError, open_source


class _RunsCode:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_parquet(path, marker, rows: int = 4) -> None:
    """An `image` column of Ray Data's pickled-object extension type whose cells run code."""
    import pickle

    from ray.data.extensions import ArrowPythonObjectType  # importing ray.data registers the extension type

    kind = ArrowPythonObjectType()
    cells = pa.array([pickle.dumps(_RunsCode(marker))] * rows, kind.storage_type)
    table = pa.table({"image": pa.ExtensionArray.from_storage(kind, cells),
                      "label": pa.array([0, 1] * (rows // 2), pa.int64())})
    pq.write_table(table, path)


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (8, 8, 1), dtype=np.uint8)
    return encode_png(torch.from_numpy(image).permute(2, 0, 1).contiguous()).numpy().tobytes()


def test_train_refuses_a_pickled_object_column_and_runs_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    marker = tmp_path / "CODE_RAN"
    pickled_parquet(src / "part-0.parquet", marker)
    before = (src / "part-0.parquet").read_bytes()
    env = os.environ | {"PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-m", "aigc_ray.cli", "train", "--dataset", f"parquet:{src}", "--image-size", "8",
         "--epochs", "1", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "column 'image' has type extension type 'ray.data.arrow_pickled_object'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()  # no cell was unpickled
    assert (src / "part-0.parquet").read_bytes() == before


def test_prepare_refuses_it_with_or_without_ray_data_registered(tmp_path):
    marker = tmp_path / "CODE_RAN"
    pickled_parquet(tmp_path / "x.parquet", marker)
    # registered in this process now; without registration the field metadata still names it
    with pytest.raises(SchemaError, match="'ray.data.arrow_pickled_object'"):
        prepare(f"parquet:{tmp_path / 'x.parquet'}", tmp_path / "out", image_size=8)
    code = ("import sys; from aigc_ray.data.sources import open_source\n"
            "try:\n    open_source(sys.argv[1])\nexcept ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code, f"parquet:{tmp_path / 'x.parquet'}"], capture_output=True,
                         text=True, env=os.environ | {"PYTHONPATH": os.getcwd()}, timeout=120).stdout
    assert "column 'image' has type extension type 'ray.data.arrow_pickled_object'" in out
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_prepared_directory_with_a_pickled_shard_is_refused_before_reading(tmp_path):
    """Training (Ray Data) and eval read prepared shards through shard_files/load_split."""
    prepared = tmp_path / "prepared"
    prepare("digits", prepared, image_size=8)
    marker = tmp_path / "CODE_RAN"
    pickled_parquet(prepared / "train-00000.parquet", marker)
    with pytest.raises(SchemaError, match="train-00000.parquet: column 'image'"):
        load_split(str(prepared), "train")
    from aigc_ray.data.pipeline import train_dataset

    with pytest.raises(SchemaError, match="column 'image'"):
        train_dataset(str(prepared))  # refused before Ray Data is asked to read anything
    assert not marker.exists()


@pytest.mark.parametrize("columns, message", [
    ({"image": pa.array(["a.png", "b.png"])}, "column 'image' has type string"),
    ({"image": pa.array([b"x", b"y"]), "label": pa.array([0.5, 1.0])}, "column 'label' has type double"),
    ({"image": pa.array([b"x", b"y"]), "label": pa.array(["0", "1"])}, "column 'label' has type string"),
    ({"pixels": pa.array([b"x", b"y"])}, "no 'image' column"),
])
def test_bad_column_types_are_clear_errors(tmp_path, columns, message):
    pq.write_table(pa.table(columns), tmp_path / "x.parquet")
    with pytest.raises(SchemaError, match=message):
        open_source(f"parquet:{tmp_path}")


def test_labels_out_of_range_are_refused_not_hung_on(tmp_path):
    pq.write_table(pa.table({"image": pa.array([_png(0), _png(1)], pa.binary()),
                             "label": pa.array([0, 2**62], pa.int64())}), tmp_path / "x.parquet")
    with pytest.raises(SourceError, match="label 4611686018427387904 out of range"):
        open_source(f"parquet:{tmp_path}")
