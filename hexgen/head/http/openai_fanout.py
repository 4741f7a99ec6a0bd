"""The HexGen requests of one OpenAI request (one per prompt and choice), sent together and read as one
stream of ``(choice index, event)``.

``n`` choices are ``n`` independent requests with seeds derived from the request's (see
:func:`hexgen.head.http.openai_request.choice_seed`); each prefills its prompt itself (the KV blocks of the
prompt are not shared between them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hexgen.client import HexGenClient
from hexgen.head.http.openai_choices import Choice, TokenTexts
from hexgen.head.http.openai_request import Translated
from hexgen.head.http.openai_response import openai_finish_reason
from hexgen.head.http.openai_stream import next_event
from hexgen.wire.protocol import DoneEvent, TokenEvent


class Fanout:
    """Streams of ``tr``'s jobs, in job order; ``choices[i]`` accumulates job i's answer."""

    def __init__(self, client: HexGenClient, tr: Translated, texts: TokenTexts) -> None:
        self.tr = tr
        self.gens = [client.stream(request_id=j.request_id, **j.params) for j in tr.jobs]
        self._iters = [g.__aiter__() for g in self.gens]
        chat = tr.endpoint == "chat"
        texts = TokenTexts(None, texts.tokenizer) if tr.tokens_as_ids else texts
        self.choices = [
            Choice(j.index, chat, texts, tr.logprobs is not None, j.prompt if tr.echo else None, tr.drop_generated)
            for j in tr.jobs
        ]

    @property
    def request_ids(self) -> list[str]:
        return [j.request_id for j in self.tr.jobs]

    async def firsts(self) -> list[TokenEvent | None]:
        """Send every request and wait for each one's first event (None: done without a token)."""
        return list(await asyncio.gather(*(next_event(it) for it in self._iters)))

    async def rest(self, firsts: list[TokenEvent | None]) -> AsyncIterator[tuple[int, TokenEvent | None]]:
        """The remaining events of every job as they come: ``(i, event)``, then ``(i, None)`` when job i is done
        (right away for a job whose first event was None). An error of any job is raised here."""
        queue: asyncio.Queue[tuple[int, TokenEvent | None, BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for ev in self._iters[i]:
                    await queue.put((i, ev, None))
                await queue.put((i, None, None))
            except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
                await queue.put((i, None, e))

        live = [i for i, f in enumerate(firsts) if f is not None]
        for i, f in enumerate(firsts):
            if f is None:
                yield i, None
        tasks = [asyncio.ensure_future(pump(i)) for i in live]
        try:
            left = len(tasks)
            while left:
                i, ev, err = await queue.get()
                if err is not None:
                    raise err
                if ev is None:
                    left -= 1
                yield i, ev
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def finish(self, i: int) -> str:
        """Record job i's done event in its choice; returns OpenAI's finish reason."""
        done = self.gens[i].done
        c = self.choices[i]
        reason = "length" if self.tr.drop_generated else openai_finish_reason(done.finish_reason if done else "stop")
        c.finish_reason = reason
        if done is not None:
            c.prompt_tokens = done.prompt_tokens
            c.cached_tokens = done.cached_tokens
            c.completion_tokens = 0 if self.tr.drop_generated else done.completion_tokens
        return reason

    def done(self) -> DoneEvent:
        """The whole request's figures: each prompt's tokens once, every choice's completion tokens."""
        firsts = [c for k, c in enumerate(self.choices) if k % self.tr.n == 0]
        prompt = sum(c.prompt_tokens for c in firsts)
        completion = sum(c.completion_tokens for c in self.choices)
        cached = sum(c.cached_tokens for c in firsts)
        return DoneEvent(self.choices[0].finish_reason or "stop", prompt, completion, cached)
