"""A small byte-level BPE tokenizer with a ChatML template, trained locally so no hub download is needed.

Digits are split into single-digit tokens (as in Qwen2), which is what makes column arithmetic learnable
for a tiny model. The chat template has no default system prompt, so verl infers an empty one.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [
    PAD_TOKEN,
    "<|im_start|>",
    EOS_TOKEN,
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]

# ChatML; `tool` turns are rendered as user turns wrapped in <tool_response> (as Qwen2.5 does), and a `tools`
# list becomes a system turn (merged with the caller's own system message, if that comes first).
CHAT_TEMPLATE = """\
{%- set skip_first = false -%}
{%- if tools -%}
{{- '<|im_start|>system\\n' -}}
{%- if messages and messages[0].role == 'system' -%}
{{- messages[0].content + '\\n\\n' -}}
{%- set skip_first = true -%}
{%- endif -%}
{{- 'You can use these tools, described as JSON inside <tools></tools>:\\n<tools>' -}}
{%- for tool in tools -%}
{{- '\\n' + (tool | tojson) -}}
{%- endfor -%}
{{- '\\n</tools>\\n\\nTo call a tool, write a JSON object with its "name" and "arguments" \
inside <tool_call></tool_call> tags.<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and skip_first -%}
{%- elif message.role == 'tool' -%}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\\n' -}}
{%- if message.content -%}
{{- message.content -}}
{%- endif -%}
{%- if message.role == 'assistant' and message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if message.content or not loop.first -%}
{{- '\\n' -}}
{%- endif -%}
{{- '<tool_call>\\n{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
{%- if fn.arguments is string -%}
{{- fn.arguments -}}
{%- else -%}
{{- fn.arguments | tojson -}}
{%- endif -%}
{{- '}\\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


# split_words=False: the pieces BPE may not merge with their neighbours. A date, a train number (a letter and
# its digits, which BPE then merges into one token), a capitalised word or an all-caps code (a station code
# such as "AVS") is a piece of its own; any other digit stands alone.
ENTITY_PATTERN = r" from | to |[0-9]{4}-[0-9]{2}-[0-9]{2}|[A-Z][0-9]+|[A-Z]+[a-z]*|[0-9]"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, split_words: bool = True, max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and wrap it for transformers (pad, eos, chat template set).

    ``split_words=False`` (the agent task) lets merges cross spaces and punctuation, so the JSON keys and
    punctuation of tool calls and answers cost a few tokens each (a trace shrinks from ~590 to ~350 tokens,
    which is what makes SFT on whole multi-turn traces affordable on CPU), while the pieces of
    ``ENTITY_PATTERN`` never merge with their neighbours: a city, a date or a train number is then the same
    tokens in the question, the tool call, the tool's answer and the final answer."""
    backend = Tokenizer(models.BPE())
    if split_words:
        splits = [pre_tokenizers.Digits(individual_digits=True)]
    else:
        splits = [pre_tokenizers.Split(Regex(ENTITY_PATTERN), behavior="isolated")]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:],
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )
