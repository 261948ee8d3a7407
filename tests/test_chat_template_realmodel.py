"""The real Qwen2.5-Coder GGUF's chat template renders exactly as transformers'
`apply_chat_template` renders it for the same file; Gemma's GGUF carries no template."""

from __future__ import annotations

import pytest
from modeldeploy.server.engine.chat_template import ChatTemplate
from modeldeploy.server.engine.tokenizer import Tokenizer
from modeldeploy.server.formats.gguf_file import GGUFFile

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    },
]

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Write a Python hello world."}],
    "system_and_turns": [
        {"role": "system", "content": "You are a terse coding assistant."},
        {"role": "user", "content": "Reverse a list?"},
        {"role": "assistant", "content": "`xs[::-1]`"},
        {"role": "user", "content": "And in place? 🙂 日本語"},
    ],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Paris, and search for 'k8s'."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                },
                {"type": "function", "function": {"name": "search", "arguments": {"q": "k8s"}}},
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "Kubernetes is..."},
    ],
    "multiline_and_whitespace": [
        {"role": "user", "content": "  line one\n\nline three\t \n"},
        {"role": "assistant", "content": "ok\n"},
    ],
}


@pytest.fixture(scope="module")
def qwen(qwen_gguf, hf_gguf_tokenizer):
    with GGUFFile.open(qwen_gguf) as gguf:
        meta = dict(gguf.metadata)
    template = ChatTemplate.load(None, meta, None)
    ours = Tokenizer.from_files(None, meta)
    theirs, _ = hf_gguf_tokenizer(qwen_gguf)
    return template, ours, theirs


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_qwen_template_matches_apply_chat_template(qwen, name, add_generation_prompt, with_tools):
    template, ours, theirs = qwen
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    expected = theirs.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    got = template.render(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        bos_token=ours.bos_token,
        eos_token=ours.eos_token,
    )
    assert got == expected
    # and the prompt ids the engine would feed the model are transformers' too
    expected_ids = theirs.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(expected_ids, dict) or hasattr(expected_ids, "input_ids"):
        expected_ids = expected_ids["input_ids"]
    assert ours.encode(got, add_special_tokens=False) == list(expected_ids)


def test_gemma_gguf_has_no_template(gemma_gguf):
    with GGUFFile.open(gemma_gguf) as gguf:
        meta = dict(gguf.metadata)
    assert ChatTemplate.load(None, meta, None) is None
