"""Training data without `datasets`: load records, detect formats, render prompt templates, tokenize with labels.

    records = load_records("orders.jsonl")                  # .jsonl / .json / .csv; errors name file:line:field
    examples = build_examples(records, tokenizer, template="llama3", max_length=512)
    batch = collate(examples[:8], tokenizer.pad_token_id)   # input_ids, attention_mask, labels (-100 = no loss)

Importing this package imports neither torch nor transformers.
"""

from llmtune.data.examples import (
    IGNORE_INDEX,
    TRAIN_ON,
    TRUNCATION,
    Example,
    build_examples,
    collate,
    is_tokenized,
    pack_examples,
    tokenized_examples,
)
from llmtune.data.formats import FORMATS, ROLES, SHAREGPT_ROLES, detect_format, record_tools, to_messages
from llmtune.data.kopitiam import bundled_corpus, bundled_instructions, split_instructions
from llmtune.data.preference import (
    PreferencePair,
    RankedRecord,
    load_preference_records,
    parse_preference,
    preference_texts,
    to_pairs,
)
from llmtune.data.records import Records, as_records, load_records, read_records
from llmtune.data.stream import BlockStream, TextSource, text_sources
from llmtune.data.templates import (
    TEMPLATES,
    Segment,
    check_template,
    llama31_chat_template,
    render_prompt,
    render_segments,
    render_text,
    stop_token_ids,
)

__all__ = [
    "FORMATS", "IGNORE_INDEX", "PreferencePair", "RankedRecord", "ROLES", "SHAREGPT_ROLES", "TEMPLATES", "TRAIN_ON", "TRUNCATION", "Example", "Records", "Segment", "as_records",
    "build_examples", "bundled_corpus", "bundled_instructions", "check_template", "collate", "detect_format",
    "llama31_chat_template", "load_preference_records", "load_records", "parse_preference", "preference_texts",
    "read_records", "pack_examples", "record_tools", "render_prompt", "render_segments", "render_text", "split_instructions",
    "stop_token_ids", "to_messages", "to_pairs", "BlockStream", "TextSource", "text_sources", "is_tokenized",
    "tokenized_examples",
]
