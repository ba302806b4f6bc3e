"""Local stand-ins for the real pairs (no hub access here): tiny Qwen2-, Qwen3- and Llama-shaped models
saved in HF format with a byte-level tokenizer, the family's special tokens and a Jinja chat template,
and a generation_config.json shaped like the family's (several EOS ids, recommended sampling fields).

Styles:
- qwen    Qwen2.5-Instruct: eos <|im_end|>, pad <|endoftext|>; generation config with EOS [<|im_end|>,
          <|endoftext|>], temperature 0.7, top_p 0.8, top_k 20 and a repetition penalty (1.05-1.1 in the real
          files; 1.3 here so that a tiny random model shows its effect within a few tokens).
- qwen3   Qwen3: the same tokenizer (<think> and </think> are ordinary added tokens, not special, as in
          Qwen3's tokenizer_config), Qwen3ForCausalLM; temperature 0.6, top_p 0.95, top_k 20.
- llama   Llama-3 with a pad token (<|end_of_text|>), generation config EOS as Llama-3.1's.
- llama31 Llama-3.1-Instruct: no pad token; EOS <|eot_id|>, generation config EOS [<|end_of_text|>,
          <|eom_id|>, <|eot_id|>], temperature 0.6, top_p 0.9.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXE = str(Path(sys.executable).with_name("tipdistill"))

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # Qwen3 marks these "special": false, so decode keeps them
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
QWEN_TEMPLATE = (  # Qwen3-style: add_generation_prompt, and enable_thinking=false pre-fills an empty think block
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Sampling fields as in each family's generation_config.json; EOS ids are filled in by token name.
GENERATION = {
    "qwen": dict(eos=["<|im_end|>", "<|endoftext|>"], do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.3),
    "qwen3": dict(eos=["<|im_end|>", "<|endoftext|>"], do_sample=True, temperature=0.6, top_p=0.95, top_k=20),
    "llama": dict(eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], do_sample=True, temperature=0.6, top_p=0.9),
    "llama31": dict(eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], do_sample=True, temperature=0.6, top_p=0.9),
}


def build_tokenizer(style: str):
    """Byte-level BPE over the 256 byte symbols (no merges) plus the family's special tokens.

    Byte-level like the real Qwen and Llama-3 tokenizers, so that transformers reloads it the same way
    (for model_type qwen2 it rebuilds a Qwen2Tokenizer from vocab and merges; a character-level
    WordLevel tokenizer would silently lose its spaces there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if style.startswith("qwen"):
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       additional_special_tokens=QWEN_SPECIALS, padding_side="left")
        fast.add_tokens(THINK_TOKENS)
        fast.chat_template = QWEN_TEMPLATE
    else:
        pad = {} if style == "llama31" else {"pad_token": "<|end_of_text|>"}
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       additional_special_tokens=LLAMA_SPECIALS, padding_side="left", **pad)
        fast.chat_template = LLAMA_TEMPLATE
    return fast


def save_model(out: Path, style: str, vocab_size: int, tokenizer, seed: int, *, head_scale: float = 1.0,
               max_positions: int = 1024) -> str:
    """A 1-layer model of the family, head size 32 (vLLM's CPU attention needs >= 32), LM head padded to
    `vocab_size` rows, saved with the tokenizer and the family's generation config. `head_scale` sharpens
    the random model's next-token distributions (a sampling-temperature change then shows clearly)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=max_positions, tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                  bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
    if style == "qwen":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif style == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    fields = dict(GENERATION[style])
    eos_ids = tokenizer.convert_tokens_to_ids(fields.pop("eos"))
    model.generation_config = GenerationConfig(**fields, eos_token_id=eos_ids, bos_token_id=common["bos_token_id"],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def cli(args, cwd, timeout=300):
    """The installed `tipdistill` script, offline."""
    # One torch thread: on a shared 2-core machine two spinning threads made tiny-model generation 30x slower.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
