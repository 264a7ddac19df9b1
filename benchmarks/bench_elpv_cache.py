"""ELPV loading: the package's ``load_dataset()`` (decodes 2,624 PNGs) vs vitscope's per-size cache.

Side by side in one process, in a temporary ``VITSCOPE_CACHE``: (1) ``elpv_dataset.utils.load_dataset``,
(2) vitscope's first load (decode + antialiased resize + atomic write of the ``.npz``), (3) a cached
load (in-process memo cleared, so the ``.npz`` is read from disk), (4) ``data_info`` on the cache.

    python benchmarks/bench_elpv_cache.py [--img-size 64]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["VITSCOPE_CACHE"] = cache
        from elpv_dataset.utils import load_dataset

        from vitscope.data import data_info, elpv

        t0 = time.perf_counter()
        images, _, _ = load_dataset()
        t_pkg = time.perf_counter() - t0
        del images
        elpv._MEMO.clear()
        t0 = time.perf_counter()
        elpv.load_elpv_arrays(args.img_size)
        t_first = time.perf_counter() - t0
        elpv._MEMO.clear()
        t0 = time.perf_counter()
        elpv.load_elpv_arrays(args.img_size)
        t_cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        info = data_info("elpv", img_size=args.img_size)
        t_info = time.perf_counter() - t0
        size = os.path.getsize(elpv.cache_path(args.img_size))
        print(f"img_size {args.img_size}, cache file {size / 2**20:.1f} MiB")
        print(f"elpv_dataset load_dataset():      {t_pkg:7.2f} s")
        print(f"vitscope first load (+resize+write): {t_first:7.2f} s")
        ratio = t_pkg / t_cached
        print(f"vitscope cached load:              {t_cached:7.3f} s  ({ratio:.0f}x faster than load_dataset)")
        print(f"data_info('elpv') from the cache:  {t_info:7.3f} s  mean {info.mean[0]:.4f} std {info.std[0]:.4f}")


if __name__ == "__main__":
    main()
