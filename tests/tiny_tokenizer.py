"""A tiny byte-level BPE tokenizer with a chat template, built offline (no downloads) for serving tests."""
from __future__ import annotations

import os

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["hello world, the capital of France is Paris.", "What is the capital of France?",
          "Once upon a time there was a tiny model that served tokens over Redis streams."]


def build_tiny_tokenizer(chat_template: bool = True):
    """A PreTrainedTokenizerFast (vocab ~300, BOS <s> prepended, EOS </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   chat_template=CHAT_TEMPLATE if chat_template else None)


def save_tiny_tokenizer(path: str) -> str:
    """Save the tiny tokenizer into ``path`` (loadable with AutoTokenizer.from_pretrained)."""
    os.makedirs(path, exist_ok=True)
    build_tiny_tokenizer().save_pretrained(path)
    return path
