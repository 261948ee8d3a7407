"""Chat templates: where they are found, that they render as transformers renders them, and
that a hostile template is refused or stopped instead of escaping the sandbox or hanging."""

from __future__ import annotations

import json
import time

import pytest
from fixtures.tiny_models import CHATML_TEMPLATE, GEMMA3_TEMPLATE, LLAMA3_TEMPLATE
from modeldeploy.server.engine.chat_template import ChatTemplate, RenderLimits
from modeldeploy.server.engine.errors import ChatTemplateError
from modeldeploy.server.errors import UserInputError

#: Exercises what Hub templates use: tojson with indent, loop controls, namespace, dict(),
#: `{% generation %}`, selectattr/map, str.format and %, `~`, reasoning aliases, tools.
FEATURE_TEMPLATE = """
{%- set ns = namespace(count=0, sys='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif -%}
  {%- set ns.count = ns.count + 1 -%}
  {%- if ns.count > 6 %}{% break %}{% endif -%}
  [{{ '%02d' % loop.index }}|{{ '{:>9}'.format(m.role) }}]
  {%- if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif -%}
  {%- if m.role == 'assistant' -%}
    {% generation %}{{ m.content ~ eos_token }}{% endgeneration %}
  {%- else -%}
    {{ m.content | trim }}
  {%- endif %}
  {%- if m.tool_calls is defined %}{% for c in m.tool_calls %}
<call>{{ c.function | tojson }}</call>{% endfor %}{% endif %}
{% endfor -%}
{%- if tools %}TOOLS {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}
{{ tools | tojson(indent=2) }}
{{ dict(a=1, b=[1, 2]) | tojson(sort_keys=true) }}{% endif -%}
{{ bos_token ~ ' sys=' ~ ns.sys ~ ' users=' ~ (messages | selectattr('role', 'equalto', 'user')
   | list | length) }}
{%- if add_generation_prompt %}
<assistant>{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — «quoted» ünïcode",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hello 🙂  "},
        {"role": "assistant", "content": "Hi!", "reasoning": "greet back"},
        {"role": "user", "content": "日本語で?"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "P"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny"},
    ],
]


def _transformers_render(template: str, messages, **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **kwargs)
    return rendered[0]


@pytest.mark.parametrize(
    "template",
    [LLAMA3_TEMPLATE, CHATML_TEMPLATE, GEMMA3_TEMPLATE, FEATURE_TEMPLATE],
    ids=["llama3", "chatml", "gemma3", "features"],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_renders_exactly_as_transformers(template, add_generation_prompt, with_tools):
    ours = ChatTemplate(template, "test")
    tools = TOOLS if with_tools else None
    for messages in CONVERSATIONS:
        expected = _transformers_render(
            template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token="<s>",
            eos_token="</s>",
        )
        got = ours.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token="<s>",
            eos_token="</s>",
        )
        assert got == expected


def test_undefined_special_tokens_render_as_nothing_like_transformers():
    template = "{{ bos_token }}|{{ messages[0].content }}|{{ eos_token }}"
    ours = ChatTemplate(template, "test").render([{"role": "user", "content": "x"}])
    assert ours == _transformers_render(template, [{"role": "user", "content": "x"}]) == "|x|"


# ---------------------------------------------------------------------------------------------
# where templates come from


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_lookup_order_override_then_model_files_then_gguf(tmp_path):
    gguf = {"tokenizer.chat_template": "gguf"}
    assert ChatTemplate.load(tmp_path, gguf, None).texts == {"default": "gguf"}
    assert ChatTemplate.load(tmp_path, {}, None) is None
    assert ChatTemplate.load(None, None, None) is None

    _write(tmp_path / "tokenizer_config.json", json.dumps({"chat_template": "tc"}))
    loaded = ChatTemplate.load(tmp_path, gguf, None)
    assert loaded.texts == {"default": "tc"}
    assert loaded.source == str(tmp_path / "tokenizer_config.json")

    _write(tmp_path / "chat_template.json", json.dumps({"chat_template": "json"}))
    assert ChatTemplate.load(tmp_path, gguf, None).texts == {"default": "json"}
    _write(tmp_path / "chat_template.jinja", "jinja")
    assert ChatTemplate.load(tmp_path, gguf, None).texts == {"default": "jinja"}

    override = _write(tmp_path / "mine.jinja", "{{ 'override' }}")
    loaded = ChatTemplate.load(tmp_path, gguf, override)
    assert loaded.render([]) == "override"
    assert "--chat-template" in loaded.source
    as_json = _write(tmp_path / "mine.json", json.dumps({"chat_template": "{{ 'j' }}"}))
    assert ChatTemplate.load(tmp_path, gguf, as_json).render([]) == "j"


def test_tokenizer_config_without_a_template_falls_through_to_gguf(tmp_path):
    _write(tmp_path / "tokenizer_config.json", json.dumps({"eos_token": "</s>"}))
    assert ChatTemplate.load(tmp_path, {"tokenizer.chat_template": "g"}, None).texts == {
        "default": "g"
    }


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path):
    named = [
        {"name": "default", "template": "plain"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]
    _write(tmp_path / "tokenizer_config.json", json.dumps({"chat_template": named}))
    template = ChatTemplate.load(tmp_path, None, None)
    assert template.names == ["default", "tool_use"]
    assert template.render([]) == "plain"
    assert template.render([], tools=TOOLS) == "tools:1"
    assert template.render([], template_name="tool_use", tools=[]) == "tools:0"
    with pytest.raises(ChatTemplateError, match="no template named 'rag'"):
        template.render([], template_name="rag")
    gguf = {"tokenizer.chat_template": "d", "tokenizer.chat_template.tool_use": "t"}
    assert ChatTemplate.load(None, gguf, None).render([], tools=TOOLS) == "t"


def test_tiny_model_directories_carry_their_template(tiny_models):
    template = ChatTemplate.load(tiny_models.hf("qwen2"), None, None)
    assert template.render([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_bad_template_files_are_user_errors_naming_the_file(tmp_path):
    with pytest.raises(ChatTemplateError, match=r"--chat-template .*missing\.jinja"):
        ChatTemplate.load(None, None, tmp_path / "missing.jinja")
    broken = _write(tmp_path / "broken.jinja", "{% for %}")
    with pytest.raises(ChatTemplateError, match=r"broken\.jinja does not compile: line 1"):
        ChatTemplate.load(None, None, broken)
    bad_json = _write(tmp_path / "bad.json", "{")
    with pytest.raises(ChatTemplateError, match=r"bad\.json: not valid JSON"):
        ChatTemplate.load(None, None, bad_json)
    assert issubclass(ChatTemplateError, UserInputError)


def test_a_broken_model_template_loads_and_fails_each_render_naming_it(tmp_path):
    _write(tmp_path / "chat_template.jinja", "{% if %}")
    template = ChatTemplate.load(tmp_path, None, None)  # completions must still be servable
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja does not compile"):
        template.render([{"role": "user", "content": "x"}])


def test_template_errors_name_the_template_and_the_reason():
    raising = ChatTemplate(
        "{{ raise_exception('Conversation roles must alternate') }}", "GGUF metadata"
    )
    with pytest.raises(ChatTemplateError, match="GGUF metadata: Conversation roles must alternate"):
        raising.render([])
    typo = ChatTemplate("{{ messages[0].content + 1 }}", "model X")
    with pytest.raises(ChatTemplateError, match="model X failed: TypeError"):
        typo.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="messages must be a list of objects"):
        typo.render(["not a message"])


# ---------------------------------------------------------------------------------------------
# the sandbox

ESCAPES = {
    "class": "{{ ''.__class__ }}",
    "mro_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "truthiness_probe": "{% if ''.__class__ %}leak{% endif %}",
    "getitem_dunder": "{{ ''['__class__'] }}",
    "cycler_globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner_globals": "{{ joiner.__init__.__globals__ }}",
    "namespace_globals": "{{ namespace.__init__.__globals__ }}",
    "function_globals": "{{ raise_exception.__globals__['__builtins__'] }}",
    "self_context": "{{ self._TemplateReference__context }}",
    "format_attribute": "{{ '{0.__class__.__base__}'.format('') }}",
    "import": "{% import 'os' as os %}{{ os.system('id') }}",
    "include": "{% include '/etc/passwd' %}",
    "extends": "{% extends '/etc/passwd' %}",
    "os_global": "{{ os.system('id') }}",
    "lipsum_globals": "{{ lipsum.__globals__ }}",
    "list_mutation": "{% set l = [] %}{{ l.append(1) }}",
    "dict_mutation": "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "namespace_dunder": "{% set ns = namespace(__class__=1) %}",
    "message_object": "{{ messages[0].content.__class__ }}",
}

BOMBS = {
    "huge_range": "{% for i in range(10**9) %}x{% endfor %}",
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "nested_string_loops": "{% for a in 'x'*50000 %}{% for b in 'x'*50000 %}{% endfor %}"
    "{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "exponential_macros": "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}"
    "{% endmacro %}{{ f(40) }}",
    "recursive_loop": "{% for m in [[1]] * 100000 recursive %}{{ loop([[1]] * 100000) }}"
    "{% endfor %}",
    "string_repeat": "{{ 'x' * 10**10 }}",
    "doubling_concat": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "doubling_plus": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "list_of_big_strings": "{{ ([('x' * 1000000)] * 1000000) | tojson }}",
    "list_doubling": "{% set ns = namespace(l=['x' * 100000]) %}{% for i in range(40) %}"
    "{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | join }}",
    "percent_width": "{{ '%999999999s' % 'x' }}",
    "format_width": "{{ '{:>999999999}'.format('x') }}",
    "format_filter_width": "{{ '%999999999s' | format('x') }}",
    "center": "{{ 'x' | center(999999999) }}",
    "ljust": "{{ 'x'.ljust(999999999) }}",
    "indent": "{{ ('\\n' * 100000) | indent(10000) }}",
    "replace": "{{ ('x' * 100000) | replace('', 'y' * 1000) }}",
    "str_replace": "{{ ('x' * 100000).replace('', 'y' * 1000) }}",
    "tojson_indent": "{{ messages | tojson(indent=999999999) }}",
    "join_generator": "{{ ('y' * 1000000).join(range(100000) | map('string')) }}",
    "many_medium_strings": "{{ range(100000) | map('replace', '', 'y' * 100000) | list | length }}",
    "slice_count": "{{ [1] | slice(999999999) | list | length }}",
    "big_power": "{{ 2 ** 100000000 }}",
    "int_squaring": "{% set ns = namespace(n=3) %}{% for i in range(64) %}"
    "{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "output_flood": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_sandbox_escapes_are_refused(name):
    template = ChatTemplate(ESCAPES[name], f"hostile/{name}")
    with pytest.raises(ChatTemplateError, match=f"hostile/{name}") as info:
        template.render([{"role": "user", "content": "hi"}])
    assert "uid=" not in str(info.value)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_resource_bombs_stop_quickly_with_a_clear_error(name):
    template = ChatTemplate(BOMBS[name], f"hostile/{name}")
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=f"hostile/{name}"):
        template.render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < RenderLimits().max_seconds + 1.5


def test_limits_are_configurable_and_bound_the_output():
    template = ChatTemplate(
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        "t",
        limits=RenderLimits(max_chars=100),
    )
    assert template.render([{"role": "user", "content": "x" * 50}]) == "x" * 50
    with pytest.raises(ChatTemplateError, match="exceeds the limit of 100"):
        template.render([{"role": "user", "content": "x" * 60}] * 2)
    steps = ChatTemplate(
        "{% for i in range(50) %}{% endfor %}", "t", limits=RenderLimits(max_steps=40)
    )
    with pytest.raises(ChatTemplateError, match="more than 40 loop iterations"):
        steps.render([])


def test_rich_objects_in_messages_reach_the_template_as_inert_placeholders():
    class Dangerous:
        def delete_everything(self):
            raise AssertionError("called from a template")

    template = ChatTemplate(
        "{{ messages[0].content }}|{{ messages[0].content.delete_everything }}", "t"
    )
    out = template.render([{"role": "user", "content": Dangerous()}])
    assert out == "<Dangerous>|"


def test_ordinary_python_idioms_still_work_in_the_sandbox():
    template = ChatTemplate(
        "{{ ', '.join(tools[0].function.parameters.properties.keys()) }}|"
        "{{ '-'.join(messages | map(attribute='role')) }}|{{ 'ab'.upper() * 2 }}|{{ 2 ** 10 }}|"
        "{{ '%-6s|' % 'x' }}{{ '{:>4}'.format(7) }}|{{ messages | length * 3 }}",
        "t",
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert template.render(messages, tools=TOOLS) == "city|user-assistant|ABAB|1024|x     |   7|6"


def test_a_large_legitimate_conversation_renders():
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i:04d}" + "y" * 3000}
        for i in range(1000)
    ]
    out = ChatTemplate(CHATML_TEMPLATE, "t").render(messages)
    assert out.count("<|im_start|>") == 1002 and len(out) > 3_000_000
    assert out == _transformers_render(CHATML_TEMPLATE, messages, add_generation_prompt=True)


def test_real_loops_and_calls_are_far_inside_the_budget():
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(2000)
    ]
    template = ChatTemplate(FEATURE_TEMPLATE, "t")
    start = time.monotonic()
    template.render(messages, tools=TOOLS * 50, bos_token="<s>", eos_token="</s>")
    assert time.monotonic() - start < 1.0
