"""Roofline estimate of hf_int8's CUDA GEMM (csrc/cuda/gemm_kernels.cu): where the time of an int8_linear call goes,
before and after a design change, on a GPU's published peak figures. An estimate, not a measurement: it decides
what to fix first while no GPU is at hand; speed is stated only from `scripts/bench_linear.py --device cuda`.

Model, per call of the tensor-core kernel (more than 8 tokens; the decode kernel is not modelled):
* weight stream: the int8 weight (N x K bytes) read once from DRAM, at the device's bandwidth when enough blocks run,
  else at what their loads in flight allow (Little's law: bytes in flight per block / DRAM latency, per block);
* int8 tensor-core work: 2 x M_pad x N_pad x K at the int8 MMA peak (M, N padded to the block tile);
* outlier product, n_out columns: old design, fp32 FMAs on CUDA cores in every block (2 x M_pad x N_pad x n_out at
  the fp32 peak); new design (fp16/bf16 activations), fp16 MMAs (the same count at the fp16 tensor-core peak). The
  columns are staged through shared memory with scattered loads, each a 32-byte L2 sector: every tile its activation
  rows' and weight rows' values of every outlier column, except that the new design's 64x64 tiles (9-64 tokens) take
  the weight codes from the weight tile already in shared memory during the main loop (activations only);
* mask scan: after its main loop, the block that finishes a tile compacts the outlier mask window by window (a
  load, ballots, two barriers: SCAN_WINDOW_CYCLES each, an assumed latency, nothing to overlap it with), whether or
  not any column is an outlier; old design one mask byte per thread, new design 16, none for the fused 64x64 tiles;
* split-K (new design): (splits + 1) x M x N x 4 bytes of int32 partial sums through the L2, plus each split's fp32
  outlier product written and read back on the fused tiles.
The time of a part is its work over its rate; the call's estimate is the largest part plus the mask scan, the outlier
product and the split-K traffic (which do not overlap the main loop). Every figure of the tables is printed by:

    python scripts/roofline_cuda.py [--gpu h100-sxm|a100-80gb] [--outlier-fraction 0.065]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    dram_gbs: float  # DRAM bandwidth, GB/s
    l2_gbs: float  # L2 bandwidth, GB/s (approximate, public microbenchmarks)
    int8_tops: float  # dense int8 tensor-core peak, TOPS
    fp16_tflops: float  # dense fp16/bf16 tensor-core peak (fp32 accumulation), TFLOPS
    fp32_tflops: float  # CUDA-core fp32 FMA peak, TFLOPS
    dram_latency_ns: float  # loaded DRAM latency, ns
    clock_ghz: float  # SM boost clock


GPUS = {
    "h100-sxm": Gpu("H100 SXM", 132, 3350.0, 10000.0, 1979.0, 989.0, 67.0, 700.0, 1.98),
    "a100-80gb": Gpu("A100 80GB SXM", 108, 2039.0, 5000.0, 624.0, 312.0, 19.5, 600.0, 1.41),
}

TILE_SMALL, TILE_LARGE = 64, 128  # launch.h: 64x64 tiles for 9..64 rows, 128x128 above
STAGES, KTILE = 3, 64  # pipeline depth and K bytes per stage (gemm_kernels.cu)
DECODE_MAX_M, SMALL_TILE_MAX_M = 8, 64
BLOCKS_PER_SM = {TILE_SMALL: 2, TILE_LARGE: 1}  # gemm_kernels.cu kBlocksPerSm64 / kBlocksPerSm128
MIN_SPLIT_KTILES, MAX_SPLITS = 4, 16  # gemm_kernels.cu kMinSplitKTiles / kMaxSplits
THREADS = {TILE_SMALL: 128, TILE_LARGE: 256}  # threads per block of each tile size
SCAN_WINDOW_CYCLES = 500  # assumed: an L2 load, five ballots, two block barriers, the warps' counts


def splits_for(m: int, n: int, k: int, sms: int) -> int:
    """The split-K plan of gemm_kernels.cu (plan_splits): blocks per tile of C."""
    tile = TILE_SMALL if m <= SMALL_TILE_MAX_M else TILE_LARGE
    tiles = math.ceil(n / tile) * math.ceil(m / tile)
    ktiles = math.ceil(k / KTILE)
    s = min(sms * BLOCKS_PER_SM[tile] // tiles, MAX_SPLITS, ktiles // MIN_SPLIT_KTILES)
    if s <= 1:
        return 1
    per = math.ceil(ktiles / s)
    return max(1, math.ceil(ktiles / per))


def estimate_us(gpu: Gpu, m: int, n: int, k: int, n_out: int, new_design: bool) -> dict[str, float]:
    """Microseconds per part of one int8_linear call of m tokens on an [n, k] weight with n_out outlier columns."""
    tile = TILE_SMALL if m <= SMALL_TILE_MAX_M else TILE_LARGE
    tiles = math.ceil(n / tile) * math.ceil(m / tile)
    splits = splits_for(m, n, k, gpu.sms) if new_design else 1
    blocks = tiles * splits
    resident = min(blocks, gpu.sms * BLOCKS_PER_SM[tile])
    in_flight = (STAGES - 1) * (tile + tile) * KTILE  # A and B stages ahead of the MMAs, per block
    latency_bound_gbs = resident * in_flight / gpu.dram_latency_ns  # bytes/ns == GB/s
    stream_gbs = min(gpu.dram_gbs, latency_bound_gbs)
    m_pad, n_pad = math.ceil(m / tile) * tile, math.ceil(n / tile) * tile
    busy = min(blocks, gpu.sms) / gpu.sms  # share of the multiprocessors (and of their MMA peak) in use
    parts = {
        "weights": n * k / stream_gbs / 1e3,
        "int8_mma": 2 * m_pad * n_pad * k / (gpu.int8_tops * busy) / 1e6,
    }
    # New design, 64x64 tiles: the outlier columns are taken inside the main loop, the weight codes from the B tile
    # in shared memory, by every split for its own K range; no mask scan after the loop.
    fused = new_design and tile == TILE_SMALL
    tiles_n, tiles_m = math.ceil(n / tile), math.ceil(m / tile)
    if n_out:
        flops = 2 * m_pad * n_pad * n_out
        rate = gpu.fp16_tflops if new_design else gpu.fp32_tflops
        # Unfused, under split-K, one block per tile (the last) runs the outlier product.
        outlier_busy = min(blocks if fused else tiles, gpu.sms) / gpu.sms
        parts["outlier_math"] = flops / (rate * outlier_busy) / 1e6
        # Scattered loads: each tile column gathers the m activation rows, each tile row the n weight rows.
        gathered = tiles_n * m + (0 if fused else tiles_m * n)
        parts["outlier_staging"] = gathered * n_out * 32 / gpu.l2_gbs / 1e3
        parts["outliers"] = parts["outlier_math"] + parts["outlier_staging"]
    columns_per_thread = 16 if new_design else 1
    windows = 0 if fused else math.ceil(k / (THREADS[tile] * columns_per_thread))
    parts["mask_scan"] = windows * SCAN_WINDOW_CYCLES / gpu.clock_ghz / 1e3
    if splits > 1:
        partials = 2 * splits * m * n * 4 if fused and n_out else 0  # each split's fp32 outlier product
        parts["split_k"] = ((splits + 1) * m * n * 4 + partials) / gpu.l2_gbs / 1e3
    parts["total"] = (
        max(parts["weights"], parts["int8_mma"])
        + parts["mask_scan"]
        + parts.get("outliers", 0.0)
        + parts.get("split_k", 0.0)
    )
    parts["splits"] = splits
    parts["stream_gbs"] = stream_gbs
    return parts


SHAPES = {  # (n, k) of real layers
    "Qwen2.5-1.5B k/v_proj": (256, 1536),
    "Qwen2.5-1.5B q/o_proj": (1536, 1536),
    "Qwen2.5-1.5B gate/up": (8960, 1536),
    "Qwen2.5-1.5B down": (1536, 8960),
    "7B q/o_proj": (4096, 4096),
    "7B down": (4096, 11008),
}
TOKENS = (9, 16, 64, 512, 4096)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-sxm")
    parser.add_argument("--outlier-fraction", type=float, default=0.065, help="fraction of K that is outlier columns")
    args = parser.parse_args(argv)
    if not 0.0 <= args.outlier_fraction <= 1.0:
        parser.error(f"--outlier-fraction must be in [0, 1], got {args.outlier_fraction!r}")
    gpu = GPUS[args.gpu]
    print(
        f"{gpu.name}: {gpu.sms} SMs, DRAM {gpu.dram_gbs:.0f} GB/s, int8 {gpu.int8_tops:.0f} TOPS, fp16 "
        f"{gpu.fp16_tflops:.0f} TFLOPS, fp32 {gpu.fp32_tflops:.1f} TFLOPS; outlier fraction {args.outlier_fraction}"
    )
    header = (
        "| layer (N x K) | tokens | old: blocks, weight GB/s, est. us (mask scan + outlier math + staging) | new: "
        "blocks, weight GB/s, est. us (mask scan + outlier math + staging) | old / new |"
    )
    print(header)
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        n_out = round(args.outlier_fraction * k)
        for m in TOKENS:
            old = estimate_us(gpu, m, n, k, n_out, new_design=False)
            new = estimate_us(gpu, m, n, k, n_out, new_design=True)
            tile = TILE_SMALL if m <= SMALL_TILE_MAX_M else TILE_LARGE
            tiles = math.ceil(n / tile) * math.ceil(m / tile)
            print(
                f"| {name} ({n} x {k}) | {m} | {tiles}, {old['stream_gbs']:.0f}, {old['total']:.1f} "
                f"({old['mask_scan']:.1f} + {old.get('outlier_math', 0.0):.1f} + "
                f"{old.get('outlier_staging', 0.0):.1f}) | {tiles * int(new['splits'])}, {new['stream_gbs']:.0f}, "
                f"{new['total']:.1f} ({new['mask_scan']:.1f} + {new.get('outlier_math', 0.0):.1f} + "
                f"{new.get('outlier_staging', 0.0):.1f}) | "
                f"{old['total'] / new['total']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
