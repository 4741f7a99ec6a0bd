"""`bin/hexgen generate`: JSON output of a real asymmetric run checked against Hugging Face greedy, and every
bad layout rejected with exit status 2 and a message naming the bad value, before any rank starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hexgen.cli.generate import main as generate_main
from tests.models import hf_greedy, llama_config, load_hf, save_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEXGEN = os.path.join(ROOT, "bin", "hexgen")
PROMPTS = ["Once upon a time there was", "What is the capital of France?"]
N_NEW = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GQA model (8 q / 2 kv heads, 4 layers) with the tiny tokenizer saved beside it."""
    return save_llama(str(tmp_path_factory.mktemp("cli-model")), llama_config(vocab_size=len(tiny_tokenizer)),
                      seed=31, tokenizer=tiny_tokenizer)


def hexgen(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, HEXGEN, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.mark.slow
def test_generate_json_matches_hugging_face(model_dir, tiny_tokenizer):
    args = ["generate", "--model", model_dir, "--hetero-config", "2", "1", "--pp-partition", "3", "1",
            "--device", "cpu", "--max-new-tokens", str(N_NEW), "--ignore-eos", "--json"]
    for p in PROMPTS:
        args += ["--prompt", p]
    proc = hexgen(*args)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(PROMPTS), proc.stdout
    hf = load_hf(model_dir)
    for prompt, row in zip(PROMPTS, rows):
        ids = tiny_tokenizer.encode(prompt)
        assert row["token_ids"] == hf_greedy(hf, ids, N_NEW)
        assert row["finish_reason"] == "length"
        assert row["text"] == tiny_tokenizer.decode(row["token_ids"], skip_special_tokens=True)
        assert row["text"]  # printable tokens only (tests/models.py): a real text
        assert row["prompt_tokens"] == len(ids) and row["completion_tokens"] == N_NEW
        assert row["layout"] == "hetero-config 2 1 / pp-partition 3 1"
        t = row["timings"]
        assert 0 < t["first_token_s"] <= t["wall_s"]
        assert t["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_generate_plain_text_streams_one_prompt(model_dir, tiny_tokenizer):
    proc = hexgen("generate", "--model", model_dir, "--hetero-config", "1", "--device", "cpu", "--max-new-tokens",
                  "8", "--ignore-eos", "--prompt", PROMPTS[0])
    assert proc.returncode == 0, proc.stderr
    ids = tiny_tokenizer.encode(PROMPTS[0])
    want = tiny_tokenizer.decode(hf_greedy(load_hf(model_dir), ids, 8), skip_special_tokens=True)
    assert proc.stdout.rstrip("\n") == want


@pytest.mark.parametrize(("layout", "message"), [
    (["--hetero-config", "2", "1", "--pp-partition", "3", "2"],
     "pp-partition: 3 2 sums to 5 but the model has 4 layers"),
    (["--hetero-config", "3", "1"],
     "hetero-config: TP degree 3 is not valid for this model (8 query heads, 2 KV heads); valid degrees: "
     "1, 2, 4, 8"),
], ids=["partition-sum", "tp-degree"])
def test_bad_layout_exits_2_from_the_command_line(model_dir, layout, message):
    proc = hexgen("generate", "--model", model_dir, "--device", "cpu", "--prompt", "hi", *layout, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"hexgen generate: {message}" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--hetero-config", "2", "1", "--pp-partition", "4", "0"],
     "pp-partition: layer count 0 must be an integer ≥ 1 (every stage needs at least one layer)"),
    (["--hetero-config", "2", "1", "--pp-partition", "4"],
     "pp-partition: 1 stages given but hetero-config has 2; give one layer count per stage"),
    (["--hetero-config", "1", "1", "1", "1", "1"], "hetero-config: 5 stages but the model has only 4 layers"),
    (["--hetero-config", "0"], "hetero-config: TP degree 0 must be ≥ 1"),
    (["--hetero-config", "8", "8", "--pp-partition", "2", "2", "--device", "cuda"],
     "hetero-config: world size 16 (sum of TP degrees) needs 16 GPUs but"),
    (["--dtype", "fp8"], "dtype: 'fp8' is not supported; use one of fp32, fp16, bf16"),
    (["--max-new-tokens", "600"], "max_new_tokens: prompt (3 tokens) + 600 exceeds the model's context of 512"),
], ids=["zero-layers", "stage-count", "too-many-stages", "tp-zero", "gpus", "dtype", "context"])
def test_bad_arguments_exit_2_before_starting_ranks(model_dir, capsys, monkeypatch, args, message):
    import hexgen.cli.generate as gen

    def no_ranks(*a, **k):
        raise AssertionError("ranks were started despite a bad configuration")

    monkeypatch.setattr(gen, "run_offline", no_ranks)
    argv = ["--model", model_dir, "--prompt", "hi", *args]
    if "--device" not in args:
        argv += ["--device", "cpu"]
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    assert f"hexgen generate: {message}" in err


def test_unknown_preset_lists_presets(capsys):
    assert generate_main(["--preset", "llama-2-7B", "--random-weights", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert ("preset: 'llama-2-7B' is unknown; choose one of llama-2-13b, llama-2-70b, llama-2-7b, llama-3.1-70b, "
            "llama-3.1-8b, tiny") in err


def test_model_dir_without_config(tmp_path, capsys):
    assert generate_main(["--model", str(tmp_path), "--prompt", "hi", "--device", "cpu"]) == 2
    assert "has no config.json" in capsys.readouterr().err
