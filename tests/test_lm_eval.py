"""lm-evaluation-harness against the HTTP server (``local-completions``), offline: a multiple-choice task
(loglikelihood: echo + logprobs, token-id prompts in batches) and a generate_until task on local data
(tests/lm_eval_tasks), the tokenizer loaded from the local model folder. The multiple-choice accuracy must
equal lm-eval's own Hugging Face backend on the same model."""
from __future__ import annotations

import os

import pytest

from tests.http_harness import PipelineSpec, start_http_deployment

lm_eval = pytest.importorskip("lm_eval")

TASKS = os.path.join(os.path.dirname(__file__), "lm_eval_tasks")


@pytest.fixture(scope="module")
def dep(tmp_path_factory, default_model_dir):
    d = start_http_deployment(str(tmp_path_factory.mktemp("lm_eval")), [PipelineSpec("p0", (1,), (30,))],
                              model_dir=default_model_dir, ready_timeout_s=400, worker_args=("--kv-tokens", "8192"))
    yield d
    d.stop()


@pytest.fixture
def offline(monkeypatch):
    """No hub: the datasets, the tokenizer and the metrics all come from local files."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.chdir(TASKS)  # the task files' data_files are relative to their folder


def evaluate(model: str, model_args: dict, tasks: list[str]) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                          task_manager=TaskManager(include_path=TASKS, include_defaults=False),
                          log_samples=False)
    return out["results"]


@pytest.mark.timeout(1800)  # two evaluations of a 30-layer model on a shared CPU
def test_lm_eval_tasks_run_against_the_server_and_match_hf(dep, default_model_dir, offline):
    api_args = {"model": "tiny", "base_url": dep.base_url + "/v1/completions", "tokenizer": default_model_dir,
                "tokenizer_backend": "huggingface", "batch_size": 4, "max_retries": 1, "max_length": 2048}
    served = evaluate("local-completions", api_args, ["hexgen_capitals", "hexgen_count"])
    hf = evaluate("hf", {"pretrained": default_model_dir, "dtype": "float32", "device": "cpu"}, ["hexgen_capitals"])
    acc = served["hexgen_capitals"]["acc,none"]
    assert acc == hf["hexgen_capitals"]["acc,none"]
    assert 0 <= served["hexgen_count"]["exact_match,none"] <= 1  # ran to the end and was scored
