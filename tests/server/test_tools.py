"""OpenAI tool calling (``jaxrt.server.tools``): the plan a request makes, the constraint it puts on the reply,
the parsers, the streaming split; then through the server with the ``openai`` client."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from jaxrt.server.protocol import APIError
from jaxrt.server.tools import ToolStream, plan, template_messages

COMPACT = {"x-guidance": {"whitespace_flexible": False}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
            **COMPACT,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: an empty object


def _body(tools=None, tool_choice=None, parallel=None):
    return SimpleNamespace(tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel)


@pytest.mark.parametrize(
    "tools,choice,parser,param",
    [
        (None, "required", None, "tool_choice"),  # a choice without tools
        ([WEATHER], None, None, "tool_choice"),  # "auto" (the default) without a parser
        ([WEATHER], "auto", None, "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, "tool_choice"),
        ([WEATHER], "sometimes", None, "tool_choice"),
        ([{"type": "retrieval"}], "required", None, "tools"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "required", None, "tools"),
        ([WEATHER, WEATHER], "required", None, "tools"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "required", None, "tools"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(tools, choice, parser, param):
    with pytest.raises(APIError) as e:
        plan(_body(tools, choice), parser)
    assert e.value.status == 400 and e.value.param == param


def test_plans_and_their_constraints():
    assert plan(_body(), None) is None
    assert plan(_body([WEATHER], "none"), None) is None  # the tools still reach the template
    named = plan(_body([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}), None)
    assert named.choice == "named" and json.loads(named.schema()) == WEATHER["function"]["parameters"]
    required = plan(_body([WEATHER, TIME], "required", parallel=False), None)
    schema = json.loads(required.schema())
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [item["properties"]["name"]["const"] for item in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert schema["x-guidance"] == COMPACT["x-guidance"]  # a tool's options apply to the whole reply
    assert "maxItems" not in json.loads(plan(_body([WEATHER], "required"), None).schema())
    auto = plan(_body([WEATHER]), "hermes")
    assert auto.choice == "auto" and auto.schema() is None


def test_parsers():
    named = plan(_body([WEATHER], {"type": "function", "function": {"name": "get_weather"}}), None)
    assert named.parse('{"city":"Oslo"}') == (None, [{"name": "get_weather", "arguments": '{"city":"Oslo"}'}])
    required = plan(_body([WEATHER, TIME], "required"), None)
    content, calls = required.parse(
        '[{"name":"get_time","parameters":{}},{"name":"get_weather","parameters":{"city":"Rome"}}]'
    )
    assert content is None and [c["name"] for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1]["arguments"]) == {"city": "Rome"}
    assert required.parse('[{"name":"get_ti') == ('[{"name":"get_ti', [])  # cut short: all content

    hermes = plan(_body([WEATHER]), "hermes")
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = hermes.parse(text)
    assert content == "Let me check." and calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    two = hermes.parse(
        '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": "{}"}</tool_call>'
    )
    assert two == (None, [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": "{}"}])
    assert hermes.parse("No tools needed.") == ("No tools needed.", [])
    assert hermes.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])

    mistral = plan(_body([WEATHER]), "mistral")
    assert mistral.keeps_special_tokens and not hermes.keeps_special_tokens
    v3 = 'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "b", "arguments": {}}]'
    assert mistral.parse(v3) == (
        "Checking.",
        [{"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "b", "arguments": "{}"}],
    )
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "[ARGS]"}[TOOL_CALLS]b[ARGS]{}'
    assert mistral.parse(v11) == (
        None,
        [{"name": "get_weather", "arguments": '{"city": "[ARGS]"}'}, {"name": "b", "arguments": "{}"}],
    )
    assert mistral.parse("No tools.") == ("No tools.", [])
    for bad in ("[TOOL_CALLS]not json", "[TOOL_CALLS]get weather[ARGS]{}", "[TOOL_CALLS]f[ARGS][1]"):
        assert mistral.parse(bad) == (bad, [])

    llama = plan(_body([WEATHER]), "llama3_json")
    assert llama.parse(' {"name": "get_weather", "parameters": {"city": "a;b"}}') == (
        None,
        [{"name": "get_weather", "arguments": '{"city": "a;b"}'}],
    )
    content, calls = llama.parse('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert content is None and [c["name"] for c in calls] == ["a", "b"]
    assert llama.parse("It is sunny.") == ("It is sunny.", [])

    py = plan(_body([WEATHER]), "pythonic")
    content, calls = py.parse(' [get_weather(city="Oslo"), get_time(), f(x=[1, None], ok=True)]')
    assert content is None and [c["name"] for c in calls] == ["get_weather", "get_time", "f"]
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Oslo"}, {}, {"x": [1, None], "ok": True}]
    for not_calls in ("[1, 2]", "[]", "[f(1)]", "[f(x=g())]", "[f(**d)]", "[a.b(x=1)]", "Sunny.", "[f(x="):
        assert py.parse(not_calls) == (not_calls, []), not_calls
    assert llama.parse('{"answer": 42}') == ('{"answer": 42}', [])  # JSON, but not a call


def _stream(tools, pieces):
    """(all text sent, the text sent per piece, the calls as {name, arguments} joined from every entry)."""
    s = ToolStream(tools)
    fed = [s.feed(p) for p in pieces]
    tail, entries, called = s.finish()
    entries = [e for _, es in fed for e in es] + entries
    calls: dict[int, dict[str, str]] = {}
    for e in entries:
        call = calls.setdefault(e["index"], {"name": "", "arguments": ""})
        call["name"] += e["function"].get("name", "")
        call["arguments"] += e["function"]["arguments"]
    assert called == bool(calls)
    sent = [t for t, _ in fed]
    return "".join(sent) + tail, sent, [calls[j] for j in sorted(calls)]


def test_streams_send_text_until_a_call_may_begin():
    hermes = plan(_body([WEATHER]), "hermes")
    pieces = [
        "Let me ",
        "check. <tool",
        '_call>{"name": "get_weather", ',
        '"arguments": {"city": "Oslo"}}',
        "</tool_call>",
    ]
    text, sent, calls = _stream(hermes, pieces)
    assert sent[:2] == ["Let me ", "check. "]  # "<tool" held back: it may begin a marker
    assert text == "Let me check. " and calls == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    text, sent, calls = _stream(hermes, ["No <to", "ol> here."])  # "<to" may begin "<tool_call>": held
    assert text == "No <tool> here." and calls == [] and sent == ["No ", "<tool> here."]
    assert _stream(hermes, ["No <ta", "ble>"])[1] == ["No <ta", "ble>"]  # "<ta" cannot

    mistral = plan(_body([WEATHER]), "mistral")
    text, sent, calls = _stream(mistral, ["Sure [TOOL", '_CALLS]get_weather[ARGS]{"city": "Oslo"}'])
    assert sent == ["Sure ", ""] and text == "Sure " and calls[0]["arguments"] == '{"city": "Oslo"}'

    llama = plan(_body([WEATHER]), "llama3_json")
    text, _, calls = _stream(llama, ['{"name": "get_weather", ', '"parameters": {"city": "Oslo"}}'])
    assert text == "" and calls[0]["name"] == "get_weather"
    text, sent, calls = _stream(llama, ['{"answer": ', "42}"])
    assert text == '{"answer": 42}' and sent == ["", ""] and calls == []  # JSON, not a call: sent at the end

    py = plan(_body([WEATHER]), "pythonic")
    text, sent, calls = _stream(py, [" [get_weather(", 'city="Oslo")]'])
    assert (
        sent == [" ", ""]
        and text == " "
        and calls == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    )

    named = plan(_body([WEATHER], {"type": "function", "function": {"name": "get_weather"}}), None)
    text, sent, calls = _stream(named, ['{"city"', ':"Oslo"}'])
    assert (
        text == "" and sent == ["", ""] and calls == [{"name": "get_weather", "arguments": '{"city":"Oslo"}'}]
    )
    s = ToolStream(named)  # the arguments stream as they come: id and name once, then fragments
    first, second = s.feed('{"city"')[1], s.feed(':"Oslo"}')[1]
    assert first[0]["id"].startswith("call_") and first[0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city"',
    }
    assert second == [{"index": 0, "function": {"arguments": ':"Oslo"}'}}] and s.finish() == ("", [], True)
    assert _stream(named, [])[2] == [{"name": "get_weather", "arguments": ""}]  # an empty reply still calls


def test_template_messages_give_templates_the_arguments_as_a_mapping():
    msgs = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
    ]
    out = template_messages(msgs)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}


# ---------------------------------------------------------------------------------------------- server


def test_named_and_required_tool_choice_through_the_server(oai, model_name):
    """A named function constrains the reply to its parameters, returned as the call's arguments (finish
    "stop", no content, as OpenAI); "required" returns at least one call (finish "tool_calls"); both streamed
    too, the calls in the last delta, the same as unstreamed."""
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(model=model_name, messages=msgs, tools=[WEATHER, TIME], max_tokens=40, temperature=0)
    r = oai.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw
    )
    msg, fin = r.choices[0].message, r.choices[0].finish_reason
    assert msg.content is None and fin == "stop" and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city"}

    r = oai.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1
    assert msg.tool_calls[0].function.name in ("get_weather", "get_time")
    json.loads(msg.tool_calls[0].function.arguments)

    for choice, fin in (
        ({"type": "function", "function": {"name": "get_weather"}}, "stop"),
        ("required", "tool_calls"),
    ):
        chunks = list(
            oai.chat.completions.create(tool_choice=choice, parallel_tool_calls=False, stream=True, **kw)
        )
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        assert (
            content == "" and {d.index for d in deltas} == {0} and chunks[-1].choices[0].finish_reason == fin
        )
        name = "".join(d.function.name or "" for d in deltas)
        arguments = "".join(d.function.arguments or "" for d in deltas)
        unstreamed = oai.chat.completions.create(tool_choice=choice, parallel_tool_calls=False, **kw)
        want = unstreamed.choices[0].message.tool_calls[0].function
        assert (name, arguments) == (want.name, want.arguments)
        if choice != "required":
            assert len(deltas) > 1  # a named function's arguments stream in pieces


def test_auto_tool_choice_reads_calls_with_the_servers_parser(oai, model_name, server):
    """With --tool-call-parser hermes a reply's <tool_call> block becomes a call (the block forced here with a
    regex: a random model writes none), streamed and not; without a parser "auto" is a 400."""
    import openai

    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(model=model_name, messages=msgs, tools=[WEATHER], max_tokens=60, temperature=0)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**kw)
    assert "tool-call-parser" in str(e.value)
    block = r'Checking\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}</tool_call>'
    server.state.tool_call_parser = "hermes"
    try:
        r = oai.chat.completions.create(extra_body={"regex": block}, **kw)
        chunks = list(oai.chat.completions.create(extra_body={"regex": block}, stream=True, **kw))
    finally:
        server.state.tool_call_parser = None
    msg = r.choices[0].message
    assert msg.content == "Checking." and r.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert content.strip() == "Checking." and "<tool" not in content
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_and_tool_messages_reach_the_chat_template(oai, model_name, server):
    """The request's tools go to the chat template (a template that renders them makes the prompt longer), and
    a conversation with an assistant's tool call and the tool's answer renders."""
    tok = server.engine.tokenizer.hf
    saved = tok.chat_template
    tok.chat_template = (  # (a newline after a block tag would be trimmed: "; " separates)
        "{% for t in tools or [] %}tool {{ t.function.name }}; {% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %} call {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}; "
        "{% endfor %}assistant:"
    )
    try:
        msgs = [{"role": "user", "content": "Weather?"}]
        kw = dict(model=model_name, max_tokens=2, temperature=0)
        plain = oai.chat.completions.create(messages=msgs, **kw).usage.prompt_tokens
        with_tools = oai.chat.completions.create(messages=msgs, tools=[WEATHER], tool_choice="none", **kw)
        assert with_tools.usage.prompt_tokens > plain
        turn = msgs + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
        r = oai.chat.completions.create(messages=turn, tools=[WEATHER], tool_choice="none", **kw)
        rendered = (
            "tool get_weather; user: Weather?; assistant:  call get_weather(Oslo); tool: sunny; assistant:"
        )
        assert r.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    finally:
        tok.chat_template = saved


def test_a_tool_constraint_and_another_constraint_conflict(http, model_name):
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "response_format": {"type": "json_object"},
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert re.search("cannot be combined", r.json()["error"]["message"])


def test_the_servers_tool_call_parser_flag():
    from jaxrt.launch_server import build_parser, build_state

    parser = build_parser()
    assert build_state(parser.parse_args([]), object).tool_call_parser is None
    assert (
        build_state(parser.parse_args(["--tool-call-parser", "hermes"]), object).tool_call_parser == "hermes"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--tool-call-parser", "nope"])
    from jaxrt.launch_server import main

    assert main(["--enable-auto-tool-choice"]) == 2  # vLLM's flag needs a parser, as in vLLM
