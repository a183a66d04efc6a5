"""Which implementation serves each conv2d pass of each measured shape, and our kernel's config
there (``kernels/conv.py``).

Where the numbers come from: ``python benchmarks/bench_conv.py --tune`` on the GPU times our
kernels over several tile configs per pass (and, for 1x1 convs, GEMM configs) against cuDNN, both
replayed from CUDA graphs, in one process, and writes this dict with a comment line naming the
device, date and versions (``$OUT/bench_conv_tuned.py.txt``); paste both here. Keys:
``conv.conv_key`` (dtype, exact shape, stride, padding, dilation, groups). Values, per pass:
  (winner, config, ours_us, cudnn_us)
  winner:  "triton" or "vendor", the faster one measured (``backend="auto"`` follows it)
  config:  our winning config: a ConvConfig tuple, ("gemm", *GemmConfig) for a 1x1 conv on the
           GEMM kernel, or None for the built-in choice
A shape the table does not list runs our kernels with the built-in configs.
"""

# Measured: device: NVIDIA H200 | date: 2026-12-01 | torch 2.11.0+cu130 | triton 3.6.0 (python benchmarks/bench_conv.py --tune --rep 30).
# wgrad entries re-measured with the TMA wgrad kernel, batch 32: device: NVIDIA H200 | date: 2026-12-02 | torch 2.11.0+cu130 | triton 3.6.0 (python benchmarks/bench_conv.py --passes wgrad --batch 32 --rep 20 --tune --tune-rep 5); batch 128: device: NVIDIA H100 80GB HBM3 | date: 2026-12-02 (python benchmarks/bench_conv.py --passes wgrad --batch 32,128 --rep 30 --tune, splits base and 2x base only); fwd and dgrad as above.
TUNED = {
    "bfloat16 128x1024x14x14 -> 2048 k1x1 s2,2 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", (128, 64, 64, 4, 4, 8, 1), 135.4, 47.9), "dgrad": ("vendor", (256, 128, 64, 8, 3, 8, 1), 181.6, 62.2), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 6, None), 106.3, 42.2)},
    "bfloat16 128x1024x14x14 -> 256 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("triton", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 25.2, 25.8), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 30.0, 29.1), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 17, None), 41.7, 30.4)},
    "bfloat16 128x1024x14x14 -> 512 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("triton", None, 41.5, 44.2), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 48.5, 46.8), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 9, None), 74.4, 47.5)},
    "bfloat16 128x128x28x28 -> 128 k3x3 s1,1 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (128, 128, 64, 4, 3, 8, 1), 78.7, 53.8), "dgrad": ("vendor", (256, 128, 64, 8, 3, 8, 1), 83.4, 54.4), "wgrad": ("vendor", (128, 64, 64, 4, 3, 8, 30, None), 99.4, 58.4)},
    "bfloat16 128x128x28x28 -> 512 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("triton", None, 39.9, 40.1), "dgrad": ("triton", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 35.2, 35.6), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 66, None), 61.9, 49.6)},
    "bfloat16 128x128x56x56 -> 128 k3x3 s2,2 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (256, 128, 64, 8, 3, 8, 1), 82.1, 60.7), "dgrad": ("vendor", (128, 128, 64, 4, 3, 8, 1), 143.4, 78.3), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 30, None), 107.0, 67.3)},
    "bfloat16 128x2048x7x7 -> 512 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", None, 23.0, 20.4), "dgrad": ("triton", None, 22.9, 23.1), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 5, None), 46.6, 25.6)},
    "bfloat16 128x256x14x14 -> 1024 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", None, 30.7, 28.9), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 25.5, 24.4), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 17, None), 42.6, 31.4)},
    "bfloat16 128x256x14x14 -> 256 k3x3 s1,1 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (128, 128, 64, 8, 3, 8, 1), 73.7, 49.6), "dgrad": ("vendor", None, 77.0, 45.4), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 16, None), 115.8, 56.7)},
    "bfloat16 128x256x28x28 -> 256 k3x3 s2,2 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (128, 128, 64, 8, 3, 8, 1), 78.8, 52.7), "dgrad": ("vendor", (128, 256, 64, 8, 3, 8, 1), 104.5, 61.4), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 16, None), 117.3, 60.4)},
    "bfloat16 128x256x56x56 -> 128 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("triton", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 79.1, 81.3), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 88.2, 87.3), "wgrad": ("vendor", None, 121.3, 114.5)},
    "bfloat16 128x256x56x56 -> 512 k1x1 s2,2 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", (256, 128, 64, 8, 3, 8, 1), 160.8, 64.5), "dgrad": ("vendor", (256, 128, 64, 8, 3, 8, 1), 254.5, 101.6), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 33, None), 79.2, 68.5)},
    "bfloat16 128x256x56x56 -> 64 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 75.5, 64.8), "dgrad": ("triton", ('gemm', 128, 128, 64, 8, 8, 3, True, False), 73.6, 74.8), "wgrad": ("vendor", None, 97.6, 94.4)},
    "bfloat16 128x3x224x224 -> 64 k7x7 s2,2 p3,3,3,3 d1,1 g1": {"fwd": ("vendor", None, 2663.2, 884.5), "dgrad": ("vendor", None, 2210.9, 1757.5), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 264, False), 5711.1, 601.5)},
    "bfloat16 128x512x14x14 -> 512 k3x3 s2,2 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (256, 128, 64, 8, 3, 8, 1), 84.1, 53.3), "dgrad": ("vendor", (128, 256, 64, 8, 3, 8, 1), 91.1, 57.1), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 4, None), 119.0, 54.2)},
    "bfloat16 128x512x28x28 -> 1024 k1x1 s2,2 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", (256, 128, 64, 8, 3, 8, 1), 132.0, 52.4), "dgrad": ("vendor", (256, 128, 64, 8, 3, 8, 1), 192.4, 75.5), "wgrad": ("vendor", None, 111.3, 58.7)},
    "bfloat16 128x512x28x28 -> 128 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("triton", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 34.6, 35.5), "dgrad": ("triton", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 40.2, 40.3), "wgrad": ("vendor", None, 62.8, 54.2)},
    "bfloat16 128x512x28x28 -> 256 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", None, 52.1, 50.9), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 60.3, 56.7), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 33, None), 72.0, 59.4)},
    "bfloat16 128x512x7x7 -> 2048 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", None, 23.1, 22.4), "dgrad": ("vendor", None, 23.0, 20.0), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 5, None), 46.8, 21.5)},
    "bfloat16 128x512x7x7 -> 512 k3x3 s1,1 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (256, 128, 64, 8, 3, 8, 1), 84.3, 48.0), "dgrad": ("vendor", (128, 256, 64, 8, 3, 8, 1), 82.2, 50.9), "wgrad": ("vendor", (128, 64, 64, 4, 3, 8, 4, None), 120.6, 51.5)},
    "bfloat16 128x64x56x56 -> 256 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("triton", ('gemm', 128, 128, 64, 8, 8, 3, True, False), 72.2, 85.3), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 71.5, 66.6), "wgrad": ("vendor", None, 96.7, 93.1)},
    "bfloat16 128x64x56x56 -> 64 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 31.3, 28.0), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 30.3, 28.1), "wgrad": ("triton", None, 43.6, 44.5)},
    "bfloat16 128x64x56x56 -> 64 k3x3 s1,1 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", None, 112.7, 71.9), "dgrad": ("vendor", None, 121.1, 85.2), "wgrad": ("vendor", None, 116.0, 76.8)},
    "bfloat16 32x1024x14x14 -> 2048 k1x1 s2,2 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", (256, 128, 64, 8, 3, 8, 1), 35.7, 15.9), "dgrad": ("vendor", None, 65.4, 21.5), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 1, None), 19.8, 13.4)},
    "bfloat16 32x1024x14x14 -> 256 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 8.0, 7.8), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 8.7, 8.6), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 6, None), 14.6, 10.4)},
    "bfloat16 32x1024x14x14 -> 512 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", None, 13.7, 10.9), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 12.8, 12.2), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 4, None), 19.3, 13.1)},
    "bfloat16 32x128x28x28 -> 128 k3x3 s1,1 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (128, 128, 64, 4, 3, 8, 1), 25.9, 17.2), "dgrad": ("vendor", (128, 128, 64, 4, 3, 8, 1), 27.0, 16.8), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 15, None), 31.4, 25.3)},
    "bfloat16 32x128x28x28 -> 512 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 11.3, 10.3), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 9.7, 8.5), "wgrad": ("vendor", (128, 64, 64, 4, 3, 8, 24, None), 16.7, 11.5)},
    "bfloat16 32x128x56x56 -> 128 k3x3 s2,2 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (256, 128, 64, 8, 3, 8, 1), 25.9, 17.2), "dgrad": ("vendor", (128, 128, 64, 4, 3, 8, 1), 40.0, 24.3), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 15, None), 31.7, 25.6)},
    "bfloat16 32x2048x7x7 -> 512 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("triton", ('gemm', 64, 128, 64, 8, 4, 4, True, False), 9.0, 9.2), "dgrad": ("vendor", None, 9.3, 8.0), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 1, None), 10.9, 7.0)},
    "bfloat16 32x256x14x14 -> 1024 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 8.7, 8.6), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 8.1, 7.8), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 6, None), 14.9, 10.4)},
    "bfloat16 32x256x14x14 -> 256 k3x3 s1,1 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (128, 128, 64, 8, 3, 8, 1), 27.5, 17.0), "dgrad": ("vendor", None, 28.4, 16.6), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 4, None), 36.9, 19.3)},
    "bfloat16 32x256x28x28 -> 256 k3x3 s2,2 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", None, 27.7, 16.9), "dgrad": ("vendor", None, 36.2, 23.0), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 4, None), 36.4, 19.2)},
    "bfloat16 32x256x56x56 -> 128 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 22.5, 22.1), "dgrad": ("triton", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 24.3, 27.4), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 66, None), 31.0, 25.0)},
    "bfloat16 32x256x56x56 -> 512 k1x1 s2,2 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", (256, 128, 64, 8, 3, 8, 1), 41.6, 20.4), "dgrad": ("vendor", (256, 128, 64, 8, 3, 8, 1), 67.7, 34.9), "wgrad": ("triton", (128, 64, 64, 4, 3, 8, 16, None), 27.5, 31.5)},
    "bfloat16 32x256x56x56 -> 64 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 21.1, 18.3), "dgrad": ("triton", None, 20.3, 23.7), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 66, None), 26.5, 21.8)},
    "bfloat16 32x3x224x224 -> 64 k7x7 s2,2 p3,3,3,3 d1,1 g1": {"fwd": ("vendor", None, 681.8, 222.0), "dgrad": ("vendor", None, 560.9, 482.8), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 66, False), 1249.2, 154.6)},
    "bfloat16 32x512x14x14 -> 512 k3x3 s2,2 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (64, 128, 64, 4, 4, 8, 1), 41.6, 16.3), "dgrad": ("vendor", (64, 128, 64, 4, 4, 8, 1), 41.8, 24.4), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 1, None), 28.1, 18.7)},
    "bfloat16 32x512x28x28 -> 1024 k1x1 s2,2 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", (128, 64, 64, 4, 4, 8, 1), 39.5, 17.4), "dgrad": ("vendor", (256, 128, 64, 8, 3, 8, 1), 50.7, 25.3), "wgrad": ("vendor", (128, 64, 64, 4, 3, 8, 4, None), 31.3, 18.8)},
    "bfloat16 32x512x28x28 -> 128 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 9.5, 8.3), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 10.6, 10.4), "wgrad": ("vendor", (128, 128, 64, 4, 3, 8, 24, None), 15.3, 10.0)},
    "bfloat16 32x512x28x28 -> 256 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 13.0, 12.3), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 15.3, 14.5), "wgrad": ("vendor", (128, 128, 64, 8, 3, 8, 16, None), 22.3, 15.5)},
    "bfloat16 32x512x7x7 -> 2048 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", None, 8.9, 7.9), "dgrad": ("vendor", ('gemm', 64, 128, 64, 8, 4, 4, True, False), 9.0, 7.1), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 1, None), 11.1, 6.8)},
    "bfloat16 32x512x7x7 -> 512 k3x3 s1,1 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", (64, 128, 64, 4, 4, 8, 1), 40.4, 16.4), "dgrad": ("vendor", (64, 128, 64, 4, 4, 8, 1), 37.9, 16.2), "wgrad": ("vendor", (64, 128, 64, 4, 3, 8, 1, None), 27.8, 18.9)},
    "bfloat16 32x64x56x56 -> 256 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 20.1, 18.9), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 20.8, 18.3), "wgrad": ("vendor", (128, 64, 64, 4, 3, 8, 66, None), 26.4, 21.9)},
    "bfloat16 32x64x56x56 -> 64 k1x1 s1,1 p0,0,0,0 d1,1 g1": {"fwd": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 8.4, 6.4), "dgrad": ("vendor", ('gemm', 128, 128, 64, 8, 4, 4, True, False), 8.4, 6.4), "wgrad": ("vendor", None, 10.3, 9.7)},
    "bfloat16 32x64x56x56 -> 64 k3x3 s1,1 p1,1,1,1 d1,1 g1": {"fwd": ("vendor", None, 28.5, 24.8), "dgrad": ("vendor", None, 30.8, 24.8), "wgrad": ("vendor", None, 34.9, 28.0)},
}
