"""Generate a tiny random Llama model and tokenizer, offline and deterministically.

Usage: ``python deploy/tiny_model.py OUT_DIR`` (with the vLLM environment's python).

The model exists so that a real vLLM server can tokenize, schedule, stream and count
tokens on a CPU-only machine with no model hub. Its text is gibberish.

- Tokenizer: byte-level BPE (vocabulary 512) trained with ``tokenizers`` on a few
  thousand generated sentences, wrapped in ``PreTrainedTokenizerFast`` with
  ``<s>``/``</s>``/``<unk>``/``<pad>`` and a chat template for the system, user and
  assistant roles. Prompts get ``<s>`` prepended; the chat template writes it itself.
- Model: ``LlamaForCausalLM`` with random weights (fixed seed): hidden 512, 8 heads
  (head_dim 64, the smallest the CPU attention kernels accept), 4 layers,
  intermediate 1024, 8192 positions, float32, saved as safetensors (11 M parameters).

The size is chosen, not minimal: a decode step (~3 ms on 2 cores) must outlast the
API server's own work per token. With a 4x smaller model one stream starved vLLM's
event loop: ``/metrics`` and the detection of a client's hang-up waited until the
stream had run to ``max_tokens``. The 8192-token context lets tests run streams long
enough to be cut or abandoned mid-way on a fast machine.

The model itself practically never emits a special token, so streams run to
``max_tokens`` (hundreds of tokens) without ``ignore_eos``. A random model samples
almost uniformly, so ``</s>`` would otherwise end ~60 % of 500-token streams early.
The last layer's MLP output carries a constant bias on hidden dimension 0, which
dominates the final RMSNorm (that dimension is ~+11 after it for every position).
The ``lm_head`` rows of the special tokens get weight -1 on that dimension and the
other rows 0 there, so every special token's logit sits ~11 below the rest: a
per-step probability of about 1e-8. ``generation_config.json`` keeps ``</s>`` as the
eos token, so real stop handling is unchanged.

A marker file is written last; a directory without it is incomplete.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as transformers_logging

MARKER = ".complete-v2"  # renamed whenever the model changes, so old copies are rebuilt
POSITIONS = 8192
SEED = 20261123
VOCAB_SIZE = 512
SENTENCE_COUNT = 4000
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")
SPECIAL_SUPPRESSION_BIAS = 16.0

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_WORD_TEXT = (
    "the a one every some gateway token meter budget user request stream model server "
    "cache queue limit cap price cost value tier latency fast slow small large first last "
    "runs counts stops waits sends reads writes opens closes grows shrinks holds keeps "
    "quickly slowly never always often today tomorrow here there over under with without "
    "and or but because while when if then so café naïve über straße año 東京 数据 ✓ →"
)


def training_sentences(count: int, rng: random.Random) -> list[str]:
    """Return ``count`` generated sentences mixing words, numbers and punctuation."""
    vocabulary = _WORD_TEXT.split()
    sentences = []
    for _ in range(count):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?,;:"))
    return sentences


def build_tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer and wrap it for ``transformers``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_sentences(SENTENCE_COUNT, rng), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", tokenizer.token_to_id("<s>"))],
    )
    bos, eos, unk, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=CHAT_TEMPLATE,
        model_max_length=POSITIONS,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Create the random Llama model whose special tokens are practically never sampled."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=POSITIONS,
        mlp_bias=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    special_ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                projection.bias.zero_()
        model.model.layers[-1].mlp.down_proj.bias[0] = SPECIAL_SUPPRESSION_BIAS
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[special_ids, 0] = -1.0
    return model


def generate(out_dir: Path) -> tuple[int, int]:
    """Write tokenizer, model and generation config to ``out_dir``; return (vocab, params)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    tokenizer = build_tokenizer(random.Random(SEED))
    model = build_model(tokenizer)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out_dir)
    (out_dir / MARKER).write_text("capgate tiny-llama\n")
    return len(tokenizer), sum(parameter.numel() for parameter in model.parameters())


def main(argv: list[str]) -> int:
    """Command-line entry point: ``tiny_model.py OUT_DIR``."""
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(argv[1])
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    vocab, params = generate(out_dir)
    print(f"tiny-llama written to {out_dir}: vocab {vocab}, {params} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
