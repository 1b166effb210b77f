"""Templates: rendering equals the model families' published Jinja chat templates, the
generation prompt equals the training prefix byte for byte and token for token, and the
labels cover exactly the answers (every turn) with their end-of-turn token.

The reference Jinja templates below are the families' published chat templates (Qwen2.5-
Instruct, Meta-Llama-3-Instruct, Gemma-3-it, generic ChatML), rendered by transformers'
own ``apply_chat_template`` — no tokenizer with those templates is available offline.
"""

from __future__ import annotations

import json

import pytest

from conftest import tokenizer_for
from peftlab.data.formats import Conversation
from peftlab.data.templates import QWEN_TOOLS_TEXT, TEMPLATES, TOOLS_TEXT, Renderer, tools_json
from peftlab.data.tokenize import IGNORE, Encoder
from peftlab.errors import DataError

CHATML_REF = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_REF = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

GEMMA_REF = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

QWEN_REF = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})

SINGLE = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another, in French?"},
    {"role": "assistant", "content": "Rouge."},
    {"role": "user", "content": "And one more."},
    {"role": "assistant", "content": "Vert."},
]
TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "tool_call", "content": CALL},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
CONVS = {"single": SINGLE, "multi": MULTI, "tools": TOOL_CONV}


def reference_messages(messages: list[dict], template: str) -> list[dict]:
    """Our roles in the shape the family's Jinja template expects."""
    out = []
    for m in messages:
        if m["role"] == "tool_call":
            if template == "qwen":
                out.append({"role": "assistant", "content": "",
                            "tool_calls": [{"type": "function", "function": json.loads(m["content"])}]})
            else:
                out.append({"role": "assistant", "content": m["content"]})
        elif m["role"] == "tool":
            out.append({"role": "ipython" if template == "llama3" else "tool", "content": m["content"]})
        else:
            out.append(dict(m))
    return out


def reference(tok, template: str, messages: list[dict], tools=None, gen: bool = False) -> str:
    ref = {"chatml": CHATML_REF, "qwen": QWEN_REF, "llama3": LLAMA3_REF, "gemma": GEMMA_REF}[template]
    msgs = reference_messages(messages, template)
    if tools and template != "qwen":  # our other templates describe tools in the system message
        text = TOOLS_TEXT.replace("{tools}", tools_json(tools))
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + text}
        else:
            msgs.insert(0, {"role": "system", "content": text})
    kwargs = {"tools": tools} if tools and template == "qwen" else {}
    return tok.apply_chat_template(msgs, chat_template=ref, tokenize=False, add_generation_prompt=gen, **kwargs)


def answer_indices(messages):
    return [i for i, m in enumerate(messages) if m["role"] in ("assistant", "tool_call")]


@pytest.mark.parametrize("template", ["chatml", "qwen", "llama3", "gemma"])
@pytest.mark.parametrize("conv", ["single", "multi", "tools"])
def test_render_equals_published_jinja_template(template, conv):
    tok = tokenizer_for("llama")
    messages = CONVS[conv]
    if conv == "tools" and template == "gemma":
        with pytest.raises(DataError, match="cannot render tool calls"):
            Renderer(template, tok).render(messages)
        return
    tools = TOOLS if conv == "tools" else None
    r = Renderer(template, tok)
    # training text = the reference rendering without the separator after the last answer
    assert r.render(messages, tools=tools) + TEMPLATES[template].sep == reference(tok, template, messages, tools)
    for i in answer_indices(messages):  # the generation prompt before every answer
        assert r.generation_prompt(messages[:i], tools=tools) == reference(tok, template, messages[:i], tools, gen=True)


def test_qwen_tools_text_is_the_published_one():
    assert QWEN_TOOLS_TEXT.startswith("# Tools\n\nYou may call one or more functions")
    assert "\n<tools>\n{tools}\n</tools>\n" in QWEN_TOOLS_TEXT


def test_chat_template_of_the_tokenizer_equals_apply_chat_template():
    tok = tokenizer_for("llama")  # SmolLM2: ChatML with a default system prompt
    r = Renderer("chat", tok)
    for messages in (SINGLE, MULTI, TOOL_CONV):
        ref = reference_messages(messages, "chat")
        assert r.render(messages) == tok.apply_chat_template(ref, tokenize=False)
        for i in answer_indices(messages):
            assert r.generation_prompt(messages[:i]) == tok.apply_chat_template(ref[:i], tokenize=False,
                                                                                add_generation_prompt=True)


EXPECTED_ANSWER = {  # how each template writes a trained answer: content + end of turn
    "alpaca": "{content}{eos}", "vicuna": " {content}{eos}", "default": " {content}{eos}",
    "chatml": "{content}<|im_end|>", "qwen": "{content}<|im_end|>", "llama3": "{content}<|eot_id|>",
    "gemma": "{content}<end_of_turn>", "chat": "{content}<|im_end|>\n",
}
EXPECTED_TOOL_CALL = {"qwen": "<tool_call>\n{content}\n</tool_call><|im_end|>"}


def trained_spans(ids, labels):
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("template", sorted(EXPECTED_ANSWER))
@pytest.mark.parametrize("conv", ["single", "multi", "tools"])
def test_masks_and_generation_prefix(arch, template, conv):
    """Labels are exactly the answers (every turn) + end of turn; prompts are the training prefix."""
    tok = tokenizer_for(arch)
    if template == "chat" and arch == "gpt2":
        pytest.skip("GPT-2's tokenizer has no chat template")
    messages = CONVS[conv]
    tools = TOOLS if conv == "tools" else None
    enc = Encoder(tok, template, max_length=4096)
    if conv == "tools" and TEMPLATES.get(template) and TEMPLATES[template].tool_call is None:
        with pytest.raises(DataError, match=f"template {template!r} cannot render tool calls"):
            enc.encode(Conversation(messages, "t", tools=tools))
        return
    ex = enc.encode(Conversation(messages, "t", tools=tools))
    text = tok.decode(ex.input_ids)
    assert text == enc.renderer.render(messages, tools=tools) or text == tok.bos_token + enc.renderer.render(
        messages, tools=tools)
    answers = [m for m in messages if m["role"] in ("assistant", "tool_call")]
    eos = tok.eos_token
    expected = []
    for m in answers:
        fmt = EXPECTED_TOOL_CALL.get(template, EXPECTED_ANSWER[template]) if m["role"] == "tool_call" \
            else EXPECTED_ANSWER[template]
        content = m["content"].strip() if template in ("llama3", "gemma") else m["content"]
        expected.append(fmt.replace("{eos}", eos).replace("{content}", content))
    spans = trained_spans(ex.input_ids, ex.labels)
    assert [tok.decode(s) for s in spans] == expected  # every answer, nothing else
    # the generation prompt before each answer is the training prefix: text and tokens
    starts = [i for i in range(len(ex.labels)) if ex.labels[i] != IGNORE and (i == 0 or ex.labels[i - 1] == IGNORE)]
    for k, i in zip(starts, answer_indices(messages)):
        prompt = enc.prompt_ids(messages[:i], tools=tools)
        assert prompt == ex.input_ids[:k]
        assert tok.decode(prompt) == tok.decode(ex.input_ids[:k])
        assert enc.renderer.render(messages, tools=tools).startswith(
            enc.renderer.generation_prompt(messages[:i], tools=tools))


def test_eos_is_learned_when_pad_equals_eos():
    tok = tokenizer_for("llama")
    assert tok.pad_token_id == tok.eos_token_id
    from peftlab.data.collate import collate

    enc = Encoder(tok, "chatml")
    short = enc.encode(Conversation(SINGLE, "a"))
    long = enc.encode(Conversation(MULTI, "b"))
    batch = collate([short, long], tok.pad_token_id)
    row = batch["labels"][0]
    n = len(short)
    # the answer ends with <|im_end|> == eos == pad, and it is a label; the padding after is not
    end = [i for i in range(n) if short.input_ids[i] == tok.eos_token_id and short.labels[i] != IGNORE]
    assert end and int(row[end[-1]]) == tok.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_alpaca_and_vicuna_text_formulas():
    tok = tokenizer_for("gpt2")
    eos = tok.eos_token
    alpaca = Renderer("alpaca", tok).render(MULTI[:3])
    assert alpaca == ("You are terse.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue." + eos)
    vicuna = Renderer("vicuna", tok).render(SINGLE)
    assert vicuna == "BEGINNING OF CONVERSATION: USER: What is 2 + 2? ASSISTANT: It is 4." + eos
    default = Renderer("default", tok).render(SINGLE)
    assert default == "Human: What is 2 + 2?\nAssistant: It is 4." + eos


def test_system_precedence_and_train_on_prompt():
    tok = tokenizer_for("llama")
    r = Renderer("qwen", tok, system="Be brief.")
    assert r.render(SINGLE).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert r.render(MULTI).startswith("<|im_start|>system\nYou are terse.<|im_end|>")  # the record's own wins
    ex = Encoder(tok, "chatml", train_on_prompt=True).encode(Conversation(MULTI, "x"))
    assert ex.labels == ex.input_ids


def test_unknown_template_and_missing_chat_template():
    with pytest.raises(DataError, match="unknown; built-in templates"):
        Renderer("nope", tokenizer_for("llama"))
    with pytest.raises(DataError, match="has no chat template"):
        Renderer("chat", tokenizer_for("gpt2"))
