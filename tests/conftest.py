"""Shared pytest fixtures: a real redis-server, the default model, the tiny tokenizer, a fakeredis server."""
from __future__ import annotations

import os

import pytest

from tests.redis_server import RedisServer, redis_server_binary


@pytest.fixture
def redis_server():
    """URL (redis://127.0.0.1:<port>/0) of a fresh real redis-server, killed after the test.

    Skips only when redis-server is not installed (set REDIS_SERVER to point at a binary).
    """
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server, or set REDIS_SERVER)")
    server = RedisServer(binary)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def default_model_dir():
    """Folder of the converted embedded default model (SmolLM2-135M-Instruct), fetched once per session.

    Uses $HEXGEN_MODEL_CACHE when set (point CI at a cached folder), else ~/.cache/hexgen/models.
    """
    from hexgen.cli.fetch import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A tiny byte-level BPE tokenizer with a chat template, built offline (tests/tiny_tokenizer.py)."""
    from tests.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A folder holding the tiny tokenizer's files (for code that loads with AutoTokenizer)."""
    from tests.tiny_tokenizer import save_tiny_tokenizer

    return save_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny-tokenizer")))


@pytest.fixture
def server():
    """One in-memory Redis (fakeredis) that several synchronous clients of a unit test share."""
    import fakeredis

    return fakeredis.FakeServer()


@pytest.fixture
def r(server):
    """A synchronous fakeredis client of ``server``; closed after the test."""
    import fakeredis

    c = fakeredis.FakeRedis(server=server)
    yield c
    c.close()


@pytest.fixture
async def fake():
    """An in-memory async Redis (fakeredis) for fast unit tests of protocol code; closed after the test."""
    import fakeredis

    r = fakeredis.FakeAsyncRedis()
    yield r
    await r.aclose()


def _interpret_triton_without_cuda() -> None:
    """Without CUDA, Triton kernels run under Triton's interpreter (tests/test_paged_decode.py). The switch
    counts only if set before triton is first imported, and transformers imports it through torch, so it
    is set here, while pytest loads this file, before any test module is imported."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_cuda()


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", default=False,
                     help="also run the full soak (tests/test_soak.py::test_soak_full; `make soak`)")
