"""Quantized linear (ops.quant_linear) per ggml format: weight GB/s, % of the streaming read, ratio to dequantize + matmul.

    python bench/bench_quant_linear.py [--formats Q4_1,Q8_0] [--m 1,4,32,512] [--shapes smollm2,1.5b]

Decode (M <= 8) is bound by weight bytes: the figure to read is % of the streaming-read bandwidth measured in this
run. The baseline is what a quantized model costs without our kernels: dequantize the weight, then torch's matmul.
"""

import argparse
import subprocess

import torch
import torch.nn.functional as F
from common import emit, environment, median_time, streaming_read_bandwidth

from fast_inference import ops
from fast_inference.ops import quant

SHAPES = {  # (name, N, K): the projections of one layer and the head
    "smollm2": [("qkv", 960, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)],
    "1.5b": [("qkv", 2048, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960)],
}
NAMES = {name: qtype for qtype, name in quant.QTYPE_NAMES.items()}


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def random_qweight(qtype: int, n: int, k: int) -> torch.Tensor:
    if qtype in quant.WRITABLE_QTYPES:
        return ops.quantize(torch.randn(n, k) * 0.05, qtype)
    _, nbytes = quant.BLOCK_LAYOUT[qtype]
    blocks = torch.randint(0, 256, (n, quant.row_bytes(qtype, k) // nbytes, nbytes), dtype=torch.uint8)
    scale = torch.full(blocks.shape[:2], 1e-3, dtype=torch.float16).unsqueeze(-1).view(torch.uint8)
    if qtype == quant.Q6_K:
        blocks[..., 208:210] = scale
    else:
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    return blocks.reshape(n, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="Q4_0,Q4_1,Q8_0,Q4_K,Q5_K,Q6_K")
    parser.add_argument("--m", default="1,4,32,512")
    parser.add_argument("--shapes", default="smollm2,1.5b")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cpu")
    limit = streaming_read_bandwidth(device)
    emit({"bench": "quant_linear", **environment(device), "cpu_model": cpu_model(), "isa": ops.cpu_isa(),
          "streaming_read_GBps": round(limit / 1e9, 1)})
    for shape_set in args.shapes.split(","):
        for name, n, k in SHAPES[shape_set]:
            for fmt in args.formats.split(","):
                qtype = NAMES[fmt]
                qw = random_qweight(qtype, n, k)
                for m in (int(v) for v in args.m.split(",")):
                    x = torch.randn(m, k)
                    ours = median_time(lambda x=x, qw=qw, qt=qtype: ops.quant_linear(x, qw, qt), device, iters=args.iters)
                    base = median_time(
                        lambda x=x, qw=qw, qt=qtype, k=k: F.linear(x, ops.dequantize(qw, qt, k)), device, iters=args.iters
                    )
                    emit({
                        "shape": f"{shape_set}.{name}", "N": n, "K": k, "format": fmt, "M": m,
                        "us": round(ours * 1e6, 1),
                        "weight_GBps": round(qw.numel() / ours / 1e9, 2),
                        "pct_of_stream": round(100 * qw.numel() / ours / limit, 1),
                        "vs_dequant_matmul": round(base / ours, 2),
                    })


if __name__ == "__main__":
    main()
