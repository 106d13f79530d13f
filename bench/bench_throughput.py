"""End-to-end throughput: fast_inference vs transformers generate, and batch-1 decode vs the bandwidth bound.

A SmolLM-135M-shaped Llama (random weights, --dtype: default auto, the engine's pick on this CPU, and transformers
runs the same dtype) is written to a temp dir. Prints JSON lines (the env line names the CPU model and kernel ISA):
  throughput: 32 prompts x 128 tokens, 64 new tokens greedy (ignore_eos), output tokens/s of both engines;
    where the engine picks bf16 on a CPU without native bf16 (AVX2 only), transformers runs float32 too,
    its faster dtype there (its bf16 is torch's slow path), and speedup_vs_hf_float32 is the fair ratio
  decode_bs1: one sequence's decode step time vs (weight + KV bytes per step) / streaming read bandwidth
  decode_split: where a decode step's wall time goes at batch 1 and 32 (torch.profiler, each top-level op's
    inclusive time by category: linear/weights, attention + KV cache, other ops; the rest is Python/host)
Run: PYTHONPATH=. python bench/bench_throughput.py [--threads 1] [--num-prompts 32 --prompt-len 128 --new-tokens 64]
On an oversubscribed machine (load average >= cores) prefer --threads 1: a batch-1 decode step has ~150
parallel regions, and each OpenMP join waits for a descheduled peer thread.
"""

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

# First: fast_inference sets its OpenMP wait policy before torch loads libgomp (it applies to both engines).
import fast_inference  # noqa: F401

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, environment, streaming_read_bandwidth  # noqa: E402

SMOLLM_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


def build_smollm_like(out_dir: Path, dtype: torch.dtype):
    """Random-weight SmolLM-135M-shaped Llama dir + a word-level tokenizer covering the vocabulary
    (no BPE training: prompts are token ids; the tokenizer only has to load and decode)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(SMOLLM_135M["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", pad_token="t0")
    fast.save_pretrained(str(out_dir))
    config = transformers.LlamaConfig(eos_token_id=2, pad_token_id=0, bos_token_id=1, **SMOLLM_135M)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(str(out_dir))
    return model


# Top-level op name fragments -> category; an op's inclusive time (its aten children included) goes to it.
SPLIT_CATEGORIES = (
    ("linear", ("linear", "addmm", "aten::mm", "matmul", "quantize", "aten::bmm")),
    ("attention", ("attention", "reshape_and_cache", "scaled_dot_product")),
)


def op_category(name: str) -> str:
    return next((cat for cat, parts in SPLIT_CATEGORIES if any(p in name for p in parts)), "other_ops")


def decode_step_split(engine, prompts: list[list[int]], batch: int, steps: int) -> dict:
    """Profile `steps` pure-decode steps of `batch` sequences; ms per step by category."""
    from torch.profiler import ProfilerActivity, profile

    from fast_inference import SamplingParams

    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps + 64)
    ids = [f"split{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts[:batch]):
        engine.add_request(rid, prompt, params)
    seen = dict.fromkeys(ids, 0)
    while min(seen.values()) < 2:  # every sequence past its prefill: the steps below are decode only
        for out in engine.step():
            seen[out.request_id] += 1
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall_us = (time.perf_counter() - t0) * 1e6
    per_category = {"linear": 0.0, "attention": 0.0, "other_ops": 0.0}
    top_ops: dict[str, float] = {}
    for event in prof.events():
        if event.cpu_parent is None:
            per_category[op_category(event.name)] += event.cpu_time_total
            top_ops[event.name] = top_ops.get(event.name, 0.0) + event.cpu_time_total
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    in_ops = sum(per_category.values())
    record = {"bench": "throughput", "event": "decode_split", "batch": batch, "steps": steps}
    record["step_ms"] = round(wall_us / steps / 1e3, 3)
    for cat, us in per_category.items():
        record[f"{cat}_ms"] = round(us / steps / 1e3, 3)
    record["python_host_ms"] = round(max(wall_us - in_ops, 0.0) / steps / 1e3, 3)
    record["top_ops_ms"] = {
        name: round(us / steps / 1e3, 3) for name, us in sorted(top_ops.items(), key=lambda kv: -kv[1])[:8]
    }
    record["top_level_op_calls_per_step"] = round(
        sum(1 for e in prof.events() if e.cpu_parent is None) / steps, 1
    )
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--split-steps", type=int, default=8, help="profiled decode steps per split batch")
    ap.add_argument(
        "--split-batches", type=int, nargs="*", default=[1, 32], help="batch sizes of the step split"
    )
    ap.add_argument("--dtype", default="auto", help="auto (the engine's pick on this CPU), bfloat16, float32")
    ap.add_argument(
        "--repeats", type=int, default=2, help="interleaved timed runs of each engine (best kept)"
    )
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for both engines (default: torch's choice)",
    )
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from fast_inference import LLM, SamplingParams, ops
    from fast_inference.models.config import resolve_dtype

    device = torch.device("cpu")
    # "auto": what the engine picks on this CPU; transformers runs the same dtype.
    dtype = resolve_dtype(args.dtype, None, device)
    env = environment(device)
    env.update(dtype=args.dtype, resolved_dtype=str(dtype)[6:])
    bandwidth = streaming_read_bandwidth(device)
    emit(
        {
            "bench": "throughput",
            "event": "env",
            **env,
            "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "cpu_count": os.cpu_count(),
        }
    )

    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_smollm_like(Path(tmp), dtype)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(
            3, SMOLLM_135M["vocab_size"], (args.num_prompts, args.prompt_len), generator=gen
        )
        prompt_lists = prompts.tolist()

        # No prefix caching: each timed repeat runs the same prompts, and transformers recomputes every prefill.
        llm = LLM(
            tmp,
            dtype=args.dtype,
            kv_cache_memory="1GiB",
            max_num_seqs=max(args.num_prompts, 1),
            enable_prefix_caching=False,
        )
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        llm.generate(
            prompt_lists[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False
        )  # warm-up
        mask = torch.ones_like(prompts)
        hf_models = {} if args.skip_hf else {str(dtype)[6:]: hf_model}
        if hf_models and dtype == torch.bfloat16 and not ops.cpu_bf16_native():
            hf_models["float32"] = copy.deepcopy(hf_model).float()
        for model in hf_models.values():
            with torch.inference_mode():
                model.generate(prompts[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False)
        # Interleaved repeats, best of each: the machine is shared, so all see the same background load.
        fi_seconds = float("inf")
        hf_seconds = dict.fromkeys(hf_models, float("inf"))
        hf_outs = {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompt_lists, params, use_tqdm=False)
            fi_seconds = min(fi_seconds, time.perf_counter() - t0)
            for name, model in hf_models.items():
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    hf_outs[name] = model.generate(
                        prompts,
                        attention_mask=mask,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )
                    hf_seconds[name] = min(hf_seconds[name], time.perf_counter() - t0)
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        fi_tps = n_out / fi_seconds
        record = {
            "bench": "throughput",
            "engine": "fast_inference",
            "dtype": args.dtype,
            "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "seconds": round(fi_seconds, 3),
            "output_tokens_per_s": round(fi_tps, 1),
        }
        for i, name in enumerate(hf_models):
            hf_out = hf_outs[name]
            hf_tps = (hf_out.shape[1] - args.prompt_len) * args.num_prompts / hf_seconds[name]
            same = sum(
                o.outputs[0].token_ids == hf_out[j, args.prompt_len :].tolist() for j, o in enumerate(outs)
            )
            suffix = "" if i == 0 else f"_{name}"  # the first is transformers at the engine's dtype
            record.update(
                {
                    f"hf{suffix}_seconds": round(hf_seconds[name], 3),
                    f"hf{suffix}_output_tokens_per_s": round(hf_tps, 1),
                    f"speedup_vs_hf{suffix}": round(fi_tps / hf_tps, 2),
                    f"sequences_identical_to_hf{suffix}": same,
                }
            )
        emit(record)

        # Batch-1 decode against the memory-bandwidth bound.
        engine = llm.engine
        engine.add_request(
            "bs1",
            prompt_lists[0],
            SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.decode_steps + 8),
        )
        engine.step()  # prefill
        for _ in range(3):
            engine.step()
        steps = []
        for _ in range(args.decode_steps):
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
        engine.abort_request("bs1")
        engine.step()
        # The limit is the best bandwidth seen in this run (measured again right after the decode steps).
        bandwidth = max(bandwidth, streaming_read_bandwidth(device))
        steps.sort()
        step_s = steps[len(steps) // 2]
        cfg = engine.model_config
        weight_bytes = engine.runner.model.weight_bytes
        context = args.prompt_len + 4 + args.decode_steps // 2
        kv_bytes = context * engine.runner.kv_bytes_per_token
        bound_s = (weight_bytes + kv_bytes) / bandwidth
        emit(
            {
                "bench": "throughput",
                "event": "decode_bs1",
                "dtype": str(cfg.dtype).removeprefix("torch."),
                "step_ms": round(step_s * 1e3, 3),
                "bound_ms": round(bound_s * 1e3, 3),
                "weight_MB": round(weight_bytes / 1e6, 1),
                "kv_MB": round(kv_bytes / 1e6, 2),
                "achieved_GBps": round((weight_bytes + kv_bytes) / step_s / 1e9, 2),
                "pct_of_bandwidth_bound": round(100 * bound_s / step_s, 1),
            }
        )
        for batch in args.split_batches:
            emit(decode_step_split(engine, prompt_lists, min(batch, len(prompt_lists)), args.split_steps))


if __name__ == "__main__":
    main()
