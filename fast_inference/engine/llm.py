"""LLM: the offline batch API (vLLM-shaped generate / chat / embed) over one LLMEngine."""

from collections.abc import Sequence as SequenceABC

import torch

from .chat_template import render
from .config import EngineArgs
from .encoder_engine import EncoderEngine, is_encoder_model
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        **kwargs,
    ):
        args = EngineArgs(
            model=str(model),
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            **kwargs,
        )
        # A BERT-family encoder directory serves embeddings only (embed works, generate/chat raise ValueError).
        self.engine = EncoderEngine.from_engine_args(args) if is_encoder_model(model) else LLMEngine(args)
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Release the engine's processes (tensor-parallel workers); the LLM cannot generate afterwards."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _normalize_prompts(self, prompts) -> list[str | list[int]]:
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, SequenceABC) or len(prompts) == 0:
            raise ValueError(
                "prompts must be a string, a non-empty list of strings or a list of token-id lists"
            )
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # a single token-id prompt
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, SequenceABC):
                out.append(list(p))
            else:
                raise ValueError(
                    f"each prompt must be a string or a list of token ids, got {type(p).__name__}"
                )
        return out

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts."""
        prompt_list = self._normalize_prompts(prompts)
        if sampling_params is None:
            params_list = [self.engine.default_sampling_params()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts")
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts, assistant `tool_calls` and `tool`
        results included) or a list of them. tools: OpenAI function tools shown by the template;
        chat_template_kwargs: its extra variables (e.g. enable_thinking). The text is not parsed for calls."""
        if not self.engine.supports_generation:
            raise ValueError("this model serves embeddings only; use LLM.embed")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        if chat_template is None and tok.chat_template is None:
            raise ValueError("the tokenizer has no chat template; pass chat_template=")
        prompts: list[str | list[int]] = []
        for conv in conversations:
            ids = render(
                tok,
                conv,
                chat_template=chat_template,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                template_kwargs=chat_template_kwargs,
                tokenize=True,
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append(list(ids))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def embed(self, prompts) -> torch.Tensor:
        """float32 [len(prompts), D]: decoder models pool the last token (L2-normalised); encoder models
        pool as their sentence-transformers config says."""
        prompt_list = self._normalize_prompts(prompts)
        ids = [self.engine.tokenize(p) if isinstance(p, str) else p for p in prompt_list]
        return self.engine.embed(ids)

    def _run(
        self, prompts: list[str | list[int]], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"llm-{self._counter}"
                self._counter += 1
                engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            while engine.has_unfinished_requests():
                engine.step()
            raise
        results: dict[str, RequestOutput] = {}  # the first delta of each request, the later ones added in
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for delta in engine.step():
                    acc = results.get(delta.request_id)
                    if acc is None:
                        results[delta.request_id] = acc = delta
                    else:
                        acc.add(delta)
                    if acc.finished and bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]
