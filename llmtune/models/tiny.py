"""A tiny-model factory for tests, benchmarks and the demo: Llama from a config, a BPE tokenizer, brief pretraining.

Everything here is deterministic for a given seed and runs offline on a CPU in seconds:

    tok = train_tiny_tokenizer()                      # byte-level BPE on the bundled kopitiam corpus
    model = build_tiny_model(tok, seed=0)             # LlamaForCausalLM, random init from `seed`
    losses = pretrain(model, tok, bundled_corpus())   # next-token pretraining so it has learned some English
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from llmtune.core.errors import InvalidOptionError
from llmtune.core.options import check_positive
from llmtune.data.kopitiam import bundled_corpus, bundled_instructions, split_instructions

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "BOS", "CHATML_TEMPLATE", "EOS", "PAD", "SPECIAL_TOKENS", "build_tiny_model", "bundled_corpus",
    "bundled_instructions", "pretrain", "pretrained_tiny", "split_instructions", "tiny_llama_config",
    "train_tiny_tokenizer",
]

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
#: Special tokens of the tiny tokenizer, in id order (ids 0..7): bos/eos/pad and the llama3 and chatml markers.
SPECIAL_TOKENS = (
    BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
)
#: ChatML as a Jinja chat template, so the "tokenizer" prompt template works with the tiny tokenizer.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CONFIG_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
}


def tiny_llama_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A small Llama config (hidden 128, 4 layers, 4 heads, 2 KV heads) with any field overridden."""
    from transformers import LlamaConfig

    check_positive("vocab_size", vocab_size)
    fields = {**_CONFIG_DEFAULTS, **overrides}
    rope_theta = fields.pop("rope_theta")
    config = LlamaConfig(vocab_size=vocab_size, **fields)
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x reads `rope_theta`. Set whichever exists.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = rope_theta
    else:
        config.rope_theta = rope_theta
    return config


def build_tiny_model(
    tokenizer_or_vocab_size: PreTrainedTokenizerBase | int, *, seed: int = 0, **config_overrides: Any
) -> LlamaForCausalLM:
    """A randomly initialised tiny `LlamaForCausalLM`, identical for the same seed; leaves global RNG untouched."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = None if isinstance(tokenizer_or_vocab_size, int) else tokenizer_or_vocab_size
    vocab_size = len(tokenizer) if tokenizer is not None else tokenizer_or_vocab_size
    config = tiny_llama_config(int(vocab_size), **config_overrides)
    if tokenizer is not None:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if tokenizer is not None:
        stops = stop_token_ids(tokenizer)
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end an answer in any of llmtune's templates (`llmtune.data.templates.any_template_stop_ids`)."""
    from llmtune.data.templates import any_template_stop_ids

    return any_template_stop_ids(tokenizer)


def _default_tokenizer_texts() -> list[str]:
    """The bundled corpus plus the instruction set's text, so every order word has its own merges."""
    texts = list(bundled_corpus())
    for record in bundled_instructions():
        texts.extend(str(record[k]) for k in ("instruction", "input", "output") if record.get(k))
    return texts


def train_tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained with `tokenizers` (bundled text by default), as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _default_tokenizer_texts() if texts is None else [str(t) for t in texts]
    if not corpus:
        raise InvalidOptionError("train_tiny_tokenizer needs at least one text")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(SPECIAL_TOKENS) + len(alphabet)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise InvalidOptionError(f"vocab_size must be an int >= {minimum} (specials + 256 bytes), got {vocab_size!r}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet, show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]), model_max_length=_CONFIG_DEFAULTS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _token_stream(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """All texts tokenized and joined as `bos text eos bos text eos ...`."""
    stream: list[int] = []
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    for text in texts:
        if bos is not None:
            stream.append(int(bos))
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
    return stream


def pretrain(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | None = None,
    *,
    steps: int = 200,
    lr: float = 3e-3,
    seq_len: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
) -> list[float]:
    """Brief next-token pretraining (AdamW, warmup + cosine) on random windows of `texts`; returns each step's loss.

    Deterministic for a given seed on a given machine: windows are drawn from a seeded generator and the global
    RNG is left untouched. The model is left in eval mode. A quick in-memory fixture for tests and benchmarks
    (the demo pretrains with the `pretrain` trainer).
    """
    import torch

    for name, value in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        check_positive(name, value)
    check_positive("lr", lr, (int, float))
    texts = bundled_corpus() if texts is None else list(texts)
    stream = _token_stream(tokenizer, texts)
    if len(stream) < seq_len:
        raise InvalidOptionError(f"pretrain: the texts give {len(stream)} tokens, fewer than seq_len = {seq_len}")
    data = torch.tensor(stream, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses: list[float] = []
    model.train()
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=generator)
            batch = torch.stack([data[s:s + seq_len] for s in starts.tolist()]).to(device)
            # HF shifts labels inside the model: labels == inputs gives next-token prediction within the window.
            out = model(input_ids=batch, labels=batch)
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretrain: loss became {loss.item()} at step {len(losses)}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
    return losses


def pretrained_tiny(
    *, seed: int = 0, steps: int = 200, vocab_size: int = 512, texts: Sequence[str] | None = None,
    **config_overrides: Any,
) -> tuple[Any, PreTrainedTokenizerFast, list[float]]:
    """(model, tokenizer, losses): the tiny tokenizer, a tiny model, and `pretrain` on the bundled corpus."""
    tokenizer = train_tiny_tokenizer(vocab_size=vocab_size)
    model = build_tiny_model(tokenizer, seed=seed, **config_overrides)
    losses = pretrain(model, tokenizer, texts, steps=steps, seed=seed)
    return model, tokenizer, losses
