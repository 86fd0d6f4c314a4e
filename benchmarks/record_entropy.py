"""Order-0 entropy of the byte planes of the fp32 / fp16 / bf16 streams of real MNIST-MLP deltas, next to what the
store's compressor achieves: the evidence for the fp16 disk target discussion in benchmarks/RECORD.md.

Usage::

    python benchmarks/record_entropy.py [--mnist ../shared/data/mnist10k.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"


def _entropy(byte_plane: np.ndarray) -> float:
    counts = np.bincount(byte_plane, minlength=256).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=str(DEFAULT_MNIST))
    p.add_argument("--first", type=int, default=150, help="first step measured (early steps compress better)")
    p.add_argument("--steps", type=int, default=250)
    args = p.parse_args(argv)
    import numcodecs.blosc as nb
    import torch
    from numcodecs import Blosc
    from torch.utils.data import DataLoader

    from amnesiac.data import load_dataset
    from amnesiac.models import mlp
    from deltastore.codecs import parse_codec
    nb.use_threads = False
    torch.manual_seed(0)
    bundle = load_dataset("npz", path=args.mnist)
    model = mlp(bundle.input_shape, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    prev = torch.cat([t.detach().reshape(-1).clone() for t in model.state_dict().values()])
    n = prev.numel()
    encoders = {c: parse_codec(c, numel=n, chunk_elems=1 << 20).encoder(torch.device("cpu"))
                for c in ("fp32", "fp16", "bf16")}
    compressor = Blosc("zstd", 1, Blosc.SHUFFLE, blocksize=1 << 20)  # the store's setting
    planes = {c: [] for c in encoders}
    stored = {c: [] for c in encoders}
    step = 0
    while step < args.steps:
        loader = DataLoader(bundle.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(step))
        for x, y, _ in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            now = torch.cat([t.detach().reshape(-1).clone() for t in model.state_dict().values()])
            delta, prev = now - prev, now
            for codec, enc in encoders.items():
                data = enc.encode(delta)[0]["data"].numpy()
                if step >= args.first and step % 5 == 0:
                    b = data.view(np.uint8).reshape(-1, data.itemsize)
                    planes[codec].append([_entropy(b[:, i]) for i in range(data.itemsize)])
                    stored[codec].append(len(compressor.encode(data)) / (4 * n))
            step += 1
            if step >= args.steps:
                break
    out = {}
    for codec in encoders:
        h = np.mean(planes[codec], axis=0)
        out[codec] = {"plane_bits": h.round(2).tolist(), "order0_bound": float(h.sum() / 32),
                      "stored": float(np.mean(stored[codec]))}
        print(f"{codec}: byte-plane entropy (bits, low..high) {out[codec]['plane_bits']}; order-0 bound "
              f"{out[codec]['order0_bound']:.4f} of raw fp32; zstd L1 1 MiB byte-shuffle {out[codec]['stored']:.4f}")
    return out


if __name__ == "__main__":
    main()
