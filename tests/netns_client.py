"""A HexGen client run as its own process (inside a network namespace by tests/test_netns.py).

``python -m tests.netns_client URL MAX_NEW_TOKENS PROMPT...`` sends one greedy request per prompt at once,
with ids ``<prefix>0``, ``<prefix>1``, ... (``--prefix``), and prints one JSON line per finished request:
id, token_ids, text, finish_reason, completion_tokens, or error and message.
"""
from __future__ import annotations

import argparse
import asyncio
import json

from hexgen.client import HexGenClient, HexGenRequestError


async def _main(a: argparse.Namespace) -> None:
    async with HexGenClient(a.url, block_ms=500, timeout_s=a.timeout) as client:
        async def one(i: int, prompt: str) -> dict:
            rid = f"{a.prefix}{i}"
            try:
                res = await client.generate(prompt, request_id=rid, max_new_tokens=a.max_new_tokens,
                                            temperature=0, ignore_eos=True)
            except HexGenRequestError as e:
                return {"id": rid, "error": e.code, "message": str(e)}
            return {"id": rid, "token_ids": res.token_ids, "text": res.text, "finish_reason": res.finish_reason,
                    "completion_tokens": res.completion_tokens}

        for fut in asyncio.as_completed([one(i, p) for i, p in enumerate(a.prompts)]):
            print(json.dumps(await fut), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("url")
    p.add_argument("max_new_tokens", type=int)
    p.add_argument("prompts", nargs="+")
    p.add_argument("--prefix", default="net")
    p.add_argument("--timeout", type=float, default=180.0)
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
