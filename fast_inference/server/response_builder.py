"""The OpenAI response shapes (chat.completion, chat.completion.chunk, text_completion): choices with a
message or a delta, logprobs in chat and legacy-completions form, usage and finish_reason, for the JSON
body and the SSE chunks alike.

A stream sends one ChoicePiece per engine delta as a chunk; a JSON body folds the same pieces into a
ChoiceState per choice (ChoiceState.add) and renders that. Both come from ResponseBuilder.piece, so the
two forms cannot drift apart.

Tool calls and reasoning (chat_output.py parses them): a streamed choice keeps its parser on its
ChoiceState and sends the parsed deltas (ResponseBuilder._parsed_chunks); the JSON body parses the folded
text whole (ResponseBuilder.choice); the parser maps finish_reason to "tool_calls". Nothing outside this
file builds a response shape.
"""

import math
from dataclasses import dataclass

from ..engine.outputs import CompletionOutput, Logprob, RequestOutput
from . import sse
from .chat_output import ChatOutputSpec, ChoiceParser
from .errors import APIError

_escape = sse.escape


@dataclass(slots=True)
class ChoicePiece:
    """What one engine delta (or a prompt echo, or the opening role chunk) adds to one choice."""

    index: int
    content: str | None = None  # chat: None leaves 'content' out of the delta; completions: the text
    logprobs: dict | None = None  # in the response's form: chat {content, refusal} or completions arrays
    finish_reason: str | None = None  # OpenAI's ("stop" | "length"); None while the choice runs
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    role: bool = False  # chat: the first chunk names the assistant

    @property
    def empty(self) -> bool:
        """Nothing a client would see: a stream skips it."""
        return not self.content and self.logprobs is None and self.finish_reason is None and not self.role


@dataclass(slots=True)
class ChoiceState:
    """One choice across its pieces: what a stream needs between chunks, and the fold a JSON body renders."""

    index: int
    text_offset: int = 0  # completions logprobs: where the next token's text starts in the choice's text
    finished: bool = False  # a stream sends nothing after the finishing chunk
    content: str = ""
    logprobs: dict | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    parser: ChoiceParser | None = None  # a streamed chat choice's reasoning / tool-call parser

    def add(self, piece: ChoicePiece) -> None:
        """Fold a piece in (the JSON body's choice is the fold of the pieces a stream sends)."""
        if piece.content:
            self.content += piece.content
        if piece.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = dict(piece.logprobs)  # an echo's logprobs are shared by the n choices
            else:  # chat: content lists; completions: the four parallel arrays
                acc = self.logprobs
                for key, value in piece.logprobs.items():
                    if isinstance(value, list):
                        acc[key] = acc[key] + value
        if piece.finish_reason is not None:
            self.finish_reason = piece.finish_reason
            self.stop_reason = piece.stop_reason


def finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI's; an aborted sequence is the server's fault (503)."""
    if reason in ("stop", "length", None):
        return reason
    if reason == "abort":
        raise APIError(503, "The request was aborted by the server", code="request_aborted")
    return "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseBuilder:
    """The response shapes of one chat or completions request: pieces, the JSON body, the SSE chunks."""

    __slots__ = ("chat", "top_logprobs", "output", "_head", "_body_head", "_prefix", "_key", "_suffix")

    def __init__(
        self,
        *,
        chat: bool,
        request_id: str,
        created: int,
        model: str,
        fingerprint: str,
        top_logprobs: int | None = None,  # None: no logprobs asked for; else the top candidates per token
        output: ChatOutputSpec | None = None,  # chat: reasoning / tool calls parsed out of the text
    ) -> None:
        self.chat = chat
        self.top_logprobs = top_logprobs
        self.output = output
        self._head = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
        }
        self._body_head = {**self._head, "object": "chat.completion" if chat else "text_completion"}
        # The per-token hot path splices a JSON-escaped string into pre-encoded bytes: one string escape
        # instead of a dict build plus a full json.dumps.
        head = sse.dumps(self._head)[:-1]  # without the closing brace
        self._prefix = ("data: " + head + ',"choices":[{"index":').encode()
        self._key = ',"delta":{"content":' if chat else ',"text":'
        self._suffix = ("}" if chat else "").encode() + b',"logprobs":null,"finish_reason":null}]}\n\n'

    # -- pieces ----------------------------------------------------------------------------------------
    def piece(self, state: ChoiceState, output: CompletionOutput) -> ChoicePiece:
        """What an engine output (one delta, or a whole folded output) adds to the choice `state`; advances
        the state's text offset past its tokens."""
        logprobs = None
        if self.top_logprobs is not None and output.token_ids:
            if self.chat:
                logprobs = {"content": _chat_logprobs(output, self.top_logprobs), "refusal": None}
            else:
                logprobs = _completion_logprobs(
                    output.token_ids, output.logprobs or [], self.top_logprobs, state.text_offset
                )
                state.text_offset += sum(len(t) for t in logprobs["tokens"])
        content = output.text if (output.text or not self.chat) else None
        return ChoicePiece(
            state.index, content, logprobs, finish_reason(output.finish_reason), output.stop_reason
        )

    def role_piece(self, state: ChoiceState) -> ChoicePiece:
        """Chat streams open each choice with a chunk naming the assistant."""
        return ChoicePiece(state.index, "", role=True)

    def echo_piece(self, state: ChoiceState, prompt_text: str, prompt_logprobs: dict | None) -> ChoicePiece:
        """Completions with echo: the prompt first (with its logprobs when asked); the completion's text
        offsets count from its end."""
        state.text_offset = len(prompt_text)
        return ChoicePiece(state.index, prompt_text, prompt_logprobs)

    def prompt_logprobs(self, final: RequestOutput, token_text) -> dict:
        """echo + logprobs: the prompt's tokens in the completions form, the first one's logprob null
        (nothing predicts it; token_text(id) gives its text, which no logprob entry carries)."""
        ids = final.prompt_token_ids
        out = _completion_logprobs(ids, final.prompt_logprobs or [None] * len(ids), self.top_logprobs, 0)
        if out["tokens"]:
            out["tokens"][0] = token_text(ids[0])
            first = len(out["tokens"][0])
            out["text_offset"] = [0] + [o + first for o in out["text_offset"][1:]]
        return out

    # -- the JSON body ---------------------------------------------------------------------------------
    def choice(self, state: ChoiceState) -> dict:
        logprobs = state.logprobs
        if logprobs is None and self.top_logprobs is not None:  # asked for, but no tokens
            logprobs = {"content": [], "refusal": None} if self.chat else _completion_logprobs([], [], 0, 0)
        if self.chat:
            message = {"role": "assistant", "content": state.content, "refusal": None}
            reason = state.finish_reason
            if self.output is not None:  # the whole text parsed at once: calls that do not parse are content
                parser = self.output.new_choice()
                message.update(parser.message(state.content))
                reason = parser.finish_reason(reason)
            return {
                "index": state.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": reason,
                "stop_reason": state.stop_reason,
            }
        return {
            "index": state.index,
            "text": state.content,
            "logprobs": logprobs,
            "finish_reason": state.finish_reason,
            "stop_reason": state.stop_reason,
        }

    def body(self, states: list[ChoiceState], usage: dict) -> dict:
        choices = [self.choice(s) for s in sorted(states, key=lambda s: s.index)]
        return {**self._body_head, "choices": choices, "usage": usage}

    # -- SSE chunks ------------------------------------------------------------------------------------
    def delta_chunk(self, state: ChoiceState, output: CompletionOutput) -> bytes | None:
        """One engine delta of a streamed choice as its chunk, or None when it adds nothing visible.

        The same bytes as chunk(piece(state, output)); a plain content delta (the per-token case) skips
        the piece and goes straight to text_chunk."""
        if self.output is not None:
            return self._parsed_chunks(state, output)
        if output.finish_reason is None and (self.top_logprobs is None or not output.token_ids):
            return self.text_chunk(state.index, output.text) if output.text else None
        piece = self.piece(state, output)
        if piece.finish_reason is not None:
            state.finished = True
        elif piece.empty:
            return None
        return self.chunk(piece)

    def _parsed_chunks(self, state: ChoiceState, output: CompletionOutput) -> bytes | None:
        """A parsed chat choice's delta: its content, reasoning_content and tool-call pieces in order, one
        chunk each (the logprobs on the first, the finish reason on the last), as one write."""
        piece = self.piece(state, output)
        if state.parser is None:
            state.parser = self.output.new_choice()
        parser = state.parser
        deltas = parser.feed(output.text or "")
        reason = piece.finish_reason
        if reason is not None:
            deltas += parser.finish()
            reason = parser.finish_reason(reason)
            state.finished = True
        if not deltas:
            if piece.logprobs is None and reason is None:
                return None
            deltas = [{}]
        chunks = []
        last = len(deltas) - 1
        for j, delta in enumerate(deltas):
            logprobs = piece.logprobs if j == 0 else None
            finishing = reason if j == last else None
            if logprobs is None and finishing is None and list(delta) == ["content"]:
                chunks.append(self.text_chunk(piece.index, delta["content"]))
                continue
            choice = {"index": piece.index, "delta": delta, "logprobs": logprobs, "finish_reason": finishing}
            if finishing is not None and piece.stop_reason is not None:
                choice["stop_reason"] = piece.stop_reason
            chunks.append(sse.event({**self._head, "choices": [choice]}))
        return b"".join(chunks)

    def chunk(self, piece: ChoicePiece) -> bytes:
        if piece.logprobs is None and piece.finish_reason is None and not piece.role and piece.content:
            return self.text_chunk(piece.index, piece.content)
        return sse.event({**self._head, "choices": [self._chunk_choice(piece)]})

    def text_chunk(self, index: int, text: str) -> bytes:
        """A plain content delta: the bytes json.dumps would give for it."""
        return self._prefix + f"{index}{self._key}{_escape(text)}".encode() + self._suffix

    def _chunk_choice(self, piece: ChoicePiece) -> dict:
        if self.chat:
            delta: dict = {}
            if piece.role:
                delta["role"] = "assistant"
            if piece.content is not None:
                delta["content"] = piece.content
            choice = {
                "index": piece.index,
                "delta": delta,
                "logprobs": piece.logprobs,
                "finish_reason": piece.finish_reason,
            }
        else:
            choice = {
                "index": piece.index,
                "text": piece.content or "",
                "logprobs": piece.logprobs,
                "finish_reason": piece.finish_reason,
            }
        if piece.finish_reason is not None and piece.stop_reason is not None:
            choice["stop_reason"] = piece.stop_reason
        return choice

    def usage_chunk(self, usage: dict) -> bytes:
        return sse.event({**self._head, "choices": [], "usage": usage})


# -- logprobs ----------------------------------------------------------------------------------------------
def _ranked(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    items = sorted(
        entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 10**9, -kv[1].logprob)
    )
    return items[:k]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf


def _chat_logprobs(output: CompletionOutput, top: int) -> list[dict]:
    """Chat form of the output's tokens: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    content = []
    for token_id, entries in zip(output.token_ids, output.logprobs or []):
        chosen = entries[token_id]  # the engine always lists the chosen token
        text = chosen.decoded_token
        content.append(
            {
                "token": text,
                "logprob": _finite(chosen.logprob),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": lp.decoded_token,
                        "logprob": _finite(lp.logprob),
                        "bytes": list(lp.decoded_token.encode("utf-8")),
                    }
                    for _, lp in _ranked(entries, top)
                ],
            }
        )
    return content


def _completion_logprobs(token_ids, entries_list, top: int, text_offset: int) -> dict:
    """Completions form: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}; an entry
    of None (the first prompt token) gives nulls."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entries in zip(token_ids, entries_list):
        if entries is None:
            chosen_text, chosen_lp, top_map = None, None, None
        else:
            chosen = entries[token_id]
            chosen_text, chosen_lp = chosen.decoded_token, _finite(chosen.logprob)
            top_map = {lp.decoded_token: _finite(lp.logprob) for _, lp in _ranked(entries, top)}
        tokens.append(chosen_text)
        token_logprobs.append(chosen_lp)
        tops.append(top_map)
        offsets.append(text_offset)
        text_offset += len(chosen_text or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
