"""Tests for hexgen.engine.output: incremental detokenization, stop strings, eos, length, resume, cancel.

The tokenizers are trained offline in the test: a byte-level BPE (GPT-2 / Llama-3 style) and a
SentencePiece-style BPE with byte fallback and a context-dependent leading space (Llama-2 style).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hexgen.engine.output import CONTEXT_TOKENS, MAX_PARTIAL_TOKENS, OutputProcessor
from hexgen.engine.types import Request, SamplingParams, StepOutput

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, héllo wörld",
          "naïve café résumé", "stop here. END of story"] * 20
TEXTS = ["héllo wörld 你好 🙂", "the quick brown fox 🙂🙂 jumps, naïve café",
         "你好世界 END of story 👍🏽!", " leading  spaces\nand new lines ü"]
PROMPT = "hello world"
EOS = "</s>"
SMOLLM2 = Path.home() / ".cache/hexgen/models/SmolLM2-135M-Instruct"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 style: '▁' word marks, byte fallback for unknown characters, first leading space stripped."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", EOS]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"].update(byte_fallback=True, unk_token="<unk>")
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOS,
                                   unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return byte_level_tokenizer() if request.param == "byte_level" else sentencepiece_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def expected_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The completion's text as a full decode sees it: decode(prompt + completion) minus decode(prompt)."""
    def dec(x):
        return tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return dec(prompt_ids + ids)[len(dec(prompt_ids)):]


def make_request(prompt_ids, rid="r", output_ids=(), **params) -> Request:
    params.setdefault("max_new_tokens", 1000)
    return Request(request_id=rid, prompt_ids=list(prompt_ids), params=SamplingParams(**params),
                   output_ids=list(output_ids), meta={"entry": rid})


def feed(proc: OutputProcessor, request_id: str, ids: list[int]) -> list[StepOutput]:
    """Step ``ids`` through ``proc`` until the request finishes."""
    outs = []
    for i in ids:
        outs.append(proc.step(request_id, i))
        if outs[-1].finish_reason:
            break
    return outs


def joined(outs: list[StepOutput]) -> str:
    return "".join(o.text for o in outs)


# --- detokenization -----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [PROMPT, "", "你好世界你好"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_full_decode(tokenizer, text, prompt):
    prompt_ids, ids = encode(tokenizer, prompt), encode(tokenizer, text)
    proc = OutputProcessor(tokenizer, (tokenizer.eos_token_id,))
    proc.add(make_request(prompt_ids, max_new_tokens=len(ids)))
    outs = feed(proc, "r", ids)
    assert joined(outs) == expected_text(tokenizer, prompt_ids, ids)
    assert all("\ufffd" not in o.text for o in outs)
    assert [o.seq for o in outs] == list(range(len(ids)))
    assert [o.ids for o in outs] == [[i] for i in ids]
    assert [o.finish_reason for o in outs] == [None] * (len(ids) - 1) + ["length"]
    last = outs[-1]
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt_ids), len(ids))
    assert last.meta == {"entry": "r"}
    assert "r" not in proc and len(proc) == 0


def test_random_texts_round_trip_and_resume(tokenizer):
    rng = random.Random(0)
    alphabet = list("abc xyz,.\nüéñ") + ["你", "好", "🙂", "👍🏽", "the ", " fox"]
    prompt_ids = encode(tokenizer, PROMPT)
    for _ in range(25):
        ids = encode(tokenizer, "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))))
        full = expected_text(tokenizer, prompt_ids, ids)
        split = rng.randint(0, len(ids) - 1)
        first = OutputProcessor(tokenizer, ())
        first.add(make_request(prompt_ids, max_new_tokens=len(ids)))
        head = feed(first, "r", ids[:split])
        second = OutputProcessor(tokenizer, ())
        second.add(make_request(prompt_ids, output_ids=ids[:split], max_new_tokens=len(ids)))
        tail = feed(second, "r", ids[split:])
        assert joined(head) + joined(tail) == full
        assert all("\ufffd" not in o.text for o in head + tail)


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = encode(tokenizer, "你好 🙂")
    assert len(ids) > 4, "the test needs characters split over several byte tokens"
    proc = OutputProcessor(tokenizer, ())
    proc.add(make_request([]))
    texts = [o.text for o in feed(proc, "r", ids)]
    assert texts.count("") >= 2 and "".join(texts) == tokenizer.decode(ids)


def test_sentencepiece_leading_space_depends_on_context():
    tok = sentencepiece_tokenizer()
    ids = encode(tok, "the fox")  # '▁the', '▁fox'
    proc = OutputProcessor(tok, ())
    proc.add(make_request(encode(tok, PROMPT), rid="with_prompt"))
    proc.add(make_request([], rid="no_prompt"))
    assert joined(feed(proc, "with_prompt", ids)) == " the fox"
    assert joined(feed(proc, "no_prompt", ids)) == "the fox"


def test_length_flushes_an_incomplete_character():
    tok = byte_level_tokenizer()
    ids = encode(tok, "ab 你")[:-1]  # cut inside the 3-byte character
    proc = OutputProcessor(tok, ())
    proc.add(make_request([], max_new_tokens=len(ids)))
    outs = feed(proc, "r", ids)
    assert outs[-1].finish_reason == "length"
    assert joined(outs) == tok.decode(ids) and joined(outs).endswith("\ufffd")


def test_invalid_bytes_are_not_held_forever():
    tok = byte_level_tokenizer()
    continuation = encode(tok, "你")[-1]  # a lone UTF-8 continuation byte never completes a character
    ids = encode(tok, "a") + [continuation] * 20
    proc = OutputProcessor(tok, ())
    proc.add(make_request([], max_new_tokens=len(ids)))
    outs = feed(proc, "r", ids)
    assert "\ufffd" in joined(outs[:MAX_PARTIAL_TOKENS + 2])
    assert joined(outs) == tok.decode(ids)


class CountingTokenizer:
    """Delegates to a tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, **kwargs)


def test_decode_window_stays_bounded(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = encode(tokenizer, " ".join(TEXTS * 40))
    proc = OutputProcessor(counting, ())
    proc.add(make_request(encode(tokenizer, PROMPT * 20), max_new_tokens=len(ids)))
    assert joined(feed(proc, "r", ids)) == expected_text(tokenizer, encode(tokenizer, PROMPT * 20), ids)
    assert len(ids) > 1000 and counting.longest <= CONTEXT_TOKENS + 2 * MAX_PARTIAL_TOKENS


# --- stop strings, eos, length ------------------------------------------------------------------------

@pytest.mark.parametrize(("stop", "before"), [
    (("fox jum",), "the quick brown "), (("own f", "ick"), "the qu"), (("the",), ""),
    (("dog",), "the quick brown fox jumps over the lazy ")])
def test_stop_string_truncates_output(tokenizer, stop, before):
    ids = encode(tokenizer, "the quick brown fox jumps over the lazy dog and more")
    proc = OutputProcessor(tokenizer, ())
    proc.add(make_request([], stop=stop))
    outs = feed(proc, "r", ids)
    assert outs[-1].finish_reason == "stop" and joined(outs) == before
    assert len(outs) < len(ids) and "r" not in proc


def test_possible_stop_prefix_is_held_then_released():
    tok = byte_level_tokenizer()
    ids = encode(tok, "the quick brown fox jumps")
    proc = OutputProcessor(tok, ())
    proc.add(make_request([], stop=("quick red",)))
    outs = feed(proc, "r", ids)
    sent = ""
    for o in outs:
        sent += o.text
        assert not sent.endswith(("q", "qu", "qui", "quic", "quick", "quick "))
    assert joined(outs) == "the quick brown fox jumps"
    assert outs[-1].finish_reason is None and "r" in proc


def test_stop_on_last_allowed_token_wins_over_length():
    tok = byte_level_tokenizer()
    ids = encode(tok, "the lazy dog")
    proc = OutputProcessor(tok, ())
    proc.add(make_request([], stop=("dog",), max_new_tokens=len(ids)))
    outs = feed(proc, "r", ids)
    assert outs[-1].finish_reason == "stop" and joined(outs) == "the lazy "


@pytest.mark.parametrize("finish", ["eos", "length"])
def test_finish_flushes_text_held_for_a_stop_string(tokenizer, finish):
    ids = encode(tokenizer, "the lazy dog")
    proc = OutputProcessor(tokenizer, (tokenizer.eos_token_id,))
    n = len(ids) if finish == "length" else 100
    proc.add(make_request([], stop=(" dog!",), max_new_tokens=n))
    outs = feed(proc, "r", ids + [tokenizer.eos_token_id])
    assert outs[-1].finish_reason == finish
    assert joined(outs) == "the lazy dog"


def test_eos_finishes_without_its_text(tokenizer):
    ids = encode(tokenizer, "héllo 🙂")
    eos = tokenizer.eos_token_id
    proc = OutputProcessor(tokenizer, (eos, 12345))
    proc.add(make_request([1, 2]))
    outs = feed(proc, "r", ids + [eos] + ids)
    assert len(outs) == len(ids) + 1
    assert outs[-1].finish_reason == "eos" and outs[-1].ids == [eos]
    assert outs[-1].completion_tokens == len(ids) + 1
    assert joined(outs) == expected_text(tokenizer, [1, 2], ids) and "r" not in proc


def test_eos_text_is_not_emitted_even_for_an_ordinary_token():
    tok = byte_level_tokenizer()
    bang = encode(tok, "!")[0]
    proc = OutputProcessor(tok, (bang,))
    proc.add(make_request([], stop=("fox!",)))
    outs = feed(proc, "r", encode(tok, "the fox") + [bang])
    assert outs[-1].finish_reason == "eos" and joined(outs) == "the fox"


def test_ignore_eos_keeps_going_to_length():
    tok = byte_level_tokenizer()
    eos = tok.eos_token_id
    ids = encode(tok, "ab") + [eos] + encode(tok, "cd")
    proc = OutputProcessor(tok, (eos,))
    proc.add(make_request([], ignore_eos=True, max_new_tokens=len(ids)))
    outs = feed(proc, "r", ids)
    assert [o.finish_reason for o in outs][-2:] == [None, "length"] and joined(outs) == "abcd"


# --- resume and cancel --------------------------------------------------------------------------------

@pytest.mark.parametrize("stop", [(), ("rld 你",), ("🙂 z",)])
def test_resume_at_every_split_continues_the_text(tokenizer, stop):
    prompt_ids = encode(tokenizer, PROMPT)
    ids = encode(tokenizer, "héllo wörld 你好 🙂🙂 naïve")
    full = expected_text(tokenizer, prompt_ids, ids)
    if stop and stop[0] in full:
        full = full[:full.index(stop[0])]
    for split in range(len(ids) + 1):
        first = OutputProcessor(tokenizer, ())
        first.add(make_request(prompt_ids, stop=stop, max_new_tokens=len(ids)))
        head = feed(first, "r", ids[:split])
        if head and head[-1].finish_reason:
            continue  # finished before the split: nothing to resume
        second = OutputProcessor(tokenizer, ())
        second.add(make_request(prompt_ids, output_ids=ids[:split], stop=stop, max_new_tokens=len(ids)))
        tail = feed(second, "r", ids[split:])
        assert joined(head) + joined(tail) == full, f"split at {split}"
        assert [o.seq for o in tail] == list(range(split, split + len(tail)))
        assert tail[-1].finish_reason == ("stop" if stop and stop[0] != "🙂 z" else "length")
        assert tail[-1].completion_tokens == split + len(tail)


def test_resume_counts_earlier_tokens_toward_max_new_tokens():
    tok = byte_level_tokenizer()
    ids = encode(tok, "the quick brown fox jumps")
    proc = OutputProcessor(tok, ())
    proc.add(make_request([], output_ids=ids[:3], max_new_tokens=5))
    outs = feed(proc, "r", ids[3:])
    assert [o.seq for o in outs] == [3, 4] and outs[-1].finish_reason == "length"
    assert outs[-1].completion_tokens == 5


def test_cancel_ends_tracking():
    tok = byte_level_tokenizer()
    proc = OutputProcessor(tok, ())
    proc.add(make_request([5, 6, 7], rid="a", output_ids=[1, 2]))
    proc.add(make_request([5], rid="b"))
    proc.step("a", encode(tok, "x")[0])
    out = proc.cancel("a")
    assert (out.request_id, out.seq, out.ids, out.text, out.finish_reason) == ("a", 3, [], "", "cancelled")
    assert (out.prompt_tokens, out.completion_tokens, out.meta) == (3, 3, {"entry": "a"})
    assert "a" not in proc and "b" in proc and len(proc) == 1
    with pytest.raises(KeyError):
        proc.step("a", 1)
    with pytest.raises(KeyError):
        proc.cancel("a")


def test_adding_a_tracked_request_twice_raises():
    proc = OutputProcessor(None, ())
    proc.add(make_request([1]))
    with pytest.raises(ValueError, match="already tracked"):
        proc.add(make_request([1]))


def test_without_tokenizer_text_is_empty_and_stops_never_match():
    proc = OutputProcessor(None, (0,))
    proc.add(make_request([1, 2, 3], rid="len", stop=("a",), max_new_tokens=3))
    proc.add(make_request([1], rid="eos", output_ids=[4, 4]))
    outs = feed(proc, "len", [5, 6, 7, 8])
    assert [(o.text, o.finish_reason) for o in outs] == [("", None), ("", None), ("", "length")]
    eos = feed(proc, "eos", [9, 0, 9])
    assert [(o.seq, o.finish_reason) for o in eos] == [(2, None), (3, "eos")] and len(proc) == 0


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").exists(), reason="SmolLM2-135M-Instruct not prepared")
def test_smollm2_tokenizer_round_trip():
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    prompt_ids = encode(tok, "Say hi in three languages:")
    for text in TEXTS:
        ids = encode(tok, text)
        proc = OutputProcessor(tok, (tok.eos_token_id,))
        proc.add(make_request(prompt_ids, stop=("END",)))
        full = expected_text(tok, prompt_ids, ids)
        assert joined(feed(proc, "r", ids)) == full.split("END")[0]
    ids = encode(tok, TEXTS[0] + TEXTS[1])
    for split in range(len(ids)):
        first = OutputProcessor(tok, ())
        first.add(make_request(prompt_ids))
        second = OutputProcessor(tok, ())
        second.add(make_request(prompt_ids, output_ids=ids[:split], max_new_tokens=len(ids)))
        text = joined(feed(first, "r", ids[:split])) + joined(feed(second, "r", ids[split:]))
        assert text == expected_text(tok, prompt_ids, ids)
