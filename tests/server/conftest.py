"""One real engine (stories260K with a chat template) behind a real uvicorn server for the module
tests, plus an offline LLM over the same checkpoint as the oracle."""

from __future__ import annotations

import pytest

from frugal import LLM
from frugal.engine.async_engine import AsyncEngine
from frugal.server.serving_common import ServerConfig

from .helpers import ServerThread, make_chat_model_dir

ENGINE_KWARGS = dict(dtype="float32", kv_cache_memory="32MiB", max_num_seqs=64)
MODEL_NAME = "stories"


@pytest.fixture(scope="session")
def chat_model_dir(stories260k, tmp_path_factory):
    return make_chat_model_dir(stories260k, tmp_path_factory.mktemp("stories_chat"))


@pytest.fixture(scope="session")
def offline_llm(chat_model_dir):
    return LLM(str(chat_model_dir), **ENGINE_KWARGS)


@pytest.fixture(scope="session")
def async_engine(chat_model_dir):
    engine = AsyncEngine(LLM(str(chat_model_dir), **ENGINE_KWARGS).engine)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def server(async_engine):
    thread = ServerThread(async_engine, ServerConfig(served_model_names=(MODEL_NAME,))).start()
    yield thread
    thread.stop()
