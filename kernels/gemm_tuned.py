"""Which GEMM serves each shape class, and our kernel's config there (``kernels/gemm.py``).

Where the numbers come from: ``python benchmarks/bench_gemm.py --sweep`` on the GPU times several
configs of our kernel per class against the vendor GEMM (cuBLAS ``F.linear`` / ``torch.matmul``,
``torch._scaled_mm`` for fp8) in one process, and prints this dict with a comment line naming the
device, date and versions; paste both here. Keys: ``"<layout> <kind> <M>x<N>x<K>"``
(``gemm.shape_class``).
Values:
  config:  (block_m, block_n, block_k, group_m, warps, stages, flatten, subtile) of our
           tensor-descriptor kernel, or None for the built-in default (``gemm.default_config``)
  winner:  "triton" or "vendor" (the faster one, measured), or "unmeasured"
  triton_tflops, vendor_tflops: the measured medians (absent while unmeasured)

A class the table does not list is "unmeasured": ``aiter_dist.linear`` and the fp8 GEMMs then run
our kernel, ``tgemm.mm`` the vendor's.
"""

# Measured: device: NVIDIA H200 | date: 2026-12-01 | torch 2.11.0+cu130 | triton 3.6.0 (python benchmarks/bench_gemm.py --sweep --rep 60).
TUNED = {
    "nn bf16 16384x16384x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 706.6, "vendor_tflops": 674.1},
    "nn bf16 16384x4096x131072": {"config": (128, 256, 64, 8, 8, 3, False, False), "winner": "triton", "triton_tflops": 701.1, "vendor_tflops": 641.6},
    "nn bf16 16384x4096x16384": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 701.7, "vendor_tflops": 668.4},
    "nn bf16 16384x4096x4096": {"config": (128, 256, 64, 8, 8, 4, True, True), "winner": "triton", "triton_tflops": 683.0, "vendor_tflops": 669.7},
    "nn bf16 16384x4096x8192": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 683.9, "vendor_tflops": 645.3},
    "nn bf16 16384x8192x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 675.3, "vendor_tflops": 663.1},
    "nn bf16 2048x4096x4096": {"config": (128, 256, 64, 8, 8, 4, True, True), "winner": "triton", "triton_tflops": 727.2, "vendor_tflops": 710.1},
    "nn bf16 4096x32768x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 707.5, "vendor_tflops": 663.2},
    "nn bf16 4096x4096x32768": {"config": (128, 256, 64, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 711.3, "vendor_tflops": 721.3},
    "nn bf16 8192x8192x8192": {"config": (128, 256, 64, 8, 8, 3, True, False), "winner": "triton", "triton_tflops": 793.0, "vendor_tflops": 686.7},
    "nt bf16 16384x131072x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 701.1, "vendor_tflops": 692.1},
    "nt bf16 16384x16384x4096": {"config": (128, 256, 64, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 691.1, "vendor_tflops": 696.9},
    "nt bf16 16384x4096x16384": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 690.5, "vendor_tflops": 656.8},
    "nt bf16 16384x4096x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 703.4, "vendor_tflops": 694.7},
    "nt bf16 16384x4096x8192": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 670.5, "vendor_tflops": 647.3},
    "nt bf16 16384x8192x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 672.9, "vendor_tflops": 649.0},
    "nt bf16 2048x4096x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 721.8, "vendor_tflops": 718.9},
    "nt bf16 4096x32768x4096": {"config": (128, 256, 64, 8, 8, 4, True, True), "winner": "vendor", "triton_tflops": 696.9, "vendor_tflops": 702.4},
    "nt bf16 4096x4096x32768": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "vendor", "triton_tflops": 686.8, "vendor_tflops": 724.4},
    "nt bf16 8192x8192x8192": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 795.6, "vendor_tflops": 789.8},
    "nt fp8 16384x131072x4096": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 1008.6, "vendor_tflops": 1167.9},
    "nt fp8 16384x16384x4096": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 1035.5, "vendor_tflops": 1197.7},
    "nt fp8 16384x4096x16384": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 1031.1, "vendor_tflops": 1252.4},
    "nt fp8 16384x4096x4096": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 999.5, "vendor_tflops": 1208.2},
    "nt fp8 16384x4096x8192": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 1046.9, "vendor_tflops": 1221.1},
    "nt fp8 16384x8192x4096": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 1035.1, "vendor_tflops": 1146.8},
    "nt fp8 2048x4096x4096": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 985.1, "vendor_tflops": 1225.0},
    "nt fp8 4096x32768x4096": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 1033.3, "vendor_tflops": 1127.2},
    "nt fp8 4096x4096x32768": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 1062.1, "vendor_tflops": 1232.4},
    "nt fp8 8192x8192x8192": {"config": (256, 128, 128, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 1148.5, "vendor_tflops": 1290.4},
    "nt fp8-block 16384x131072x4096": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 849.4, "vendor_tflops": 1068.0},
    "nt fp8-block 16384x16384x4096": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 867.9, "vendor_tflops": 1088.4},
    "nt fp8-block 16384x4096x16384": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 855.4, "vendor_tflops": 1078.7},
    "nt fp8-block 16384x4096x4096": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 861.4, "vendor_tflops": 1077.7},
    "nt fp8-block 16384x4096x8192": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 936.4, "vendor_tflops": 1126.9},
    "nt fp8-block 16384x8192x4096": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 863.1, "vendor_tflops": 1077.6},
    "nt fp8-block 2048x4096x4096": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 811.4, "vendor_tflops": 1167.1},
    "nt fp8-block 4096x32768x4096": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 856.5, "vendor_tflops": 1115.8},
    "nt fp8-block 4096x4096x32768": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 890.0, "vendor_tflops": 1141.1},
    "nt fp8-block 8192x8192x8192": {"config": (128, 128, 128, 8, 8, 4, False, False), "winner": "vendor", "triton_tflops": 938.8, "vendor_tflops": 1327.3},
    "tn bf16 131072x4096x16384": {"config": (128, 256, 64, 8, 8, 3, False, False), "winner": "triton", "triton_tflops": 692.3, "vendor_tflops": 679.6},
    "tn bf16 16384x4096x16384": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "vendor", "triton_tflops": 691.5, "vendor_tflops": 695.1},
    "tn bf16 32768x4096x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "vendor", "triton_tflops": 693.8, "vendor_tflops": 695.8},
    "tn bf16 4096x16384x16384": {"config": (128, 256, 64, 8, 8, 3, True, False), "winner": "vendor", "triton_tflops": 702.7, "vendor_tflops": 711.8},
    "tn bf16 4096x32768x4096": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 675.6, "vendor_tflops": 658.8},
    "tn bf16 4096x4096x16384": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "vendor", "triton_tflops": 708.0, "vendor_tflops": 708.6},
    "tn bf16 4096x4096x2048": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 702.9, "vendor_tflops": 696.3},
    "tn bf16 4096x8192x16384": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "vendor", "triton_tflops": 688.9, "vendor_tflops": 689.6},
    "tn bf16 8192x4096x16384": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 707.7, "vendor_tflops": 690.0},
    "tn bf16 8192x8192x8192": {"config": (128, 256, 64, 16, 8, 3, True, False), "winner": "triton", "triton_tflops": 795.8, "vendor_tflops": 693.6},
}
