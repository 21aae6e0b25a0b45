"""The pure translation of OpenAI requests (node/openai/translate.py), and the requests a real OpenClaw agent
sent to a node (tests/fixtures/openclaw_requests.json, recorded by test_openclaw_agent.py): each is accepted
and translated without dropping what it asks for."""

import json
from pathlib import Path

import pytest

from pinkybrain.node.openai.errors import OpenAIError
from pinkybrain.node.openai.llama import compile_grammar
from pinkybrain.node.openai.schema import ChatCompletionRequest
from pinkybrain.node.openai.translate import (
    normalize_messages,
    output_schema,
    parse_body,
    parse_tool_output,
    refuse_unsupported,
    requested_max_tokens,
    response_schema,
    sampling,
    tool_plan,
    uses_extended_features,
    with_tool_prompt,
)

FIXTURE = Path(__file__).parent / "fixtures" / "openclaw_requests.json"
DEFAULTS = {"max_tokens": 512, "temperature": 0.7, "top_p": 0.95}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def chat(**body) -> ChatCompletionRequest:
    return parse_body(json.dumps({"model": "m", **body}).encode(), ChatCompletionRequest)


def test_roles_and_parts_become_the_alternating_turns_templates_want():
    body = chat(messages=[
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
        {"role": "developer", "content": "Dev."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Rain."},
        {"role": "user", "content": "And tomorrow?"}])
    conv = normalize_messages(body.messages)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user"]
    assert conv.messages[0]["content"] == "Sys.\n\nDev."
    assert conv.messages[1]["content"] == "Part one.\nPart two."
    assert json.loads(conv.messages[2]["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    assert "c1" in conv.messages[3]["content"] and "get_weather" in conv.messages[3]["content"]
    assert conv.messages[3]["content"].endswith("And tomorrow?") and conv.last_user == "And tomorrow?"
    assert conv.image_param is None


def test_image_parts_are_located_and_other_parts_refused():
    conv = normalize_messages(chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]}]).messages)
    assert conv.image_param == "messages[0].content[1]"
    with pytest.raises(OpenAIError) as err:
        normalize_messages(chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]).messages)
    assert err.value.status == 400 and err.value.param == "messages[0].content[0]"


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": []}, "messages", "invalid_value"),
    ({}, "messages", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_value"),
])
def test_validation_errors_name_the_parameter(body, param, code):
    with pytest.raises(OpenAIError) as err:
        parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_n_best_of_logit_bias_and_too_many_stops_are_refused():
    for extra, param in (({"n": 3}, "n"), ({"logit_bias": {"1": 2}}, "logit_bias"), ({"stop": list("abcde")}, "stop")):
        with pytest.raises(OpenAIError) as err:
            refuse_unsupported(chat(messages=[{"role": "user", "content": "x"}], **extra))
        assert err.value.param == param


def test_sampling_takes_max_completion_tokens_stop_seed_and_penalties():
    body = chat(messages=[{"role": "user", "content": "x"}], max_completion_tokens=7, max_tokens=99, stop="END",
                seed=5, presence_penalty=0.5, frequency_penalty=-0.5, temperature=0)
    assert requested_max_tokens(body) == 7
    assert sampling(body, DEFAULTS) == {"max_tokens": 7, "temperature": 0, "top_p": 0.95, "stop": ["END"], "seed": 5,
                                        "presence_penalty": 0.5, "frequency_penalty": -0.5}
    assert sampling(chat(messages=[{"role": "user", "content": "x"}]), DEFAULTS)["max_tokens"] == 512
    assert uses_extended_features(body) == ["stop", "seed", "presence_penalty", "frequency_penalty"]


def test_tool_plans_schemas_and_grammars():
    base = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}
    assert tool_plan(chat(**base, tool_choice="none")) is None
    auto = tool_plan(chat(**base))
    schema = output_schema(auto, None)
    assert len(schema["oneOf"]) == 2 and compile_grammar(schema, "tools") is not None
    named = tool_plan(chat(**base, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    call = output_schema(named, None)["properties"]["tool_call"]
    assert call["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert "get_weather" in with_tool_prompt([{"role": "system", "content": "S"}], named)[0]["content"]
    with pytest.raises(OpenAIError):
        tool_plan(chat(**base, tool_choice={"type": "function", "function": {"name": "other"}}))
    with pytest.raises(OpenAIError) as err:
        compile_grammar({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "response_format")
    assert err.value.code == "invalid_schema"


def test_response_formats():
    assert response_schema(chat(messages=[{"role": "user", "content": "x"}], response_format={"type": "text"}).response_format) is None
    assert response_schema(chat(messages=[{"role": "user", "content": "x"}],
                                response_format={"type": "json_object"}).response_format) == {"type": "object"}
    with pytest.raises(OpenAIError):
        response_schema(chat(messages=[{"role": "user", "content": "x"}],
                             response_format={"type": "json_schema", "json_schema": {"name": "n"}}).response_format)


def test_tool_output_parsing():
    content, calls = parse_tool_output('{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}')
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"} and calls[0]["id"].startswith("call_")
    assert parse_tool_output('{"response": "Hello"}') == ("Hello", None)
    assert parse_tool_output('{"response": "Cut in the mid') == ("Cut in the mid", None)
    assert parse_tool_output("plain words") == ("plain words", None)


# -- what a real OpenClaw agent sent --------------------------------------------------------------------
def openclaw_chat_requests() -> list[dict]:
    records = json.loads(FIXTURE.read_text())
    chats = [r["body"] for r in records if r["path"].endswith("/chat/completions")]
    assert chats, "the fixture holds no chat request: rerun test_openclaw_agent.py with PINKYBRAIN_RECORD_FIXTURES=1"
    return chats


def test_openclaw_requests_are_accepted_whole():
    for raw in openclaw_chat_requests():
        body = parse_body(json.dumps(raw).encode(), ChatCompletionRequest)
        refuse_unsupported(body)
        conv = normalize_messages(body.messages)
        assert conv.image_param is None and conv.messages[-1]["role"] == "user"
        if raw.get("max_completion_tokens"):
            assert requested_max_tokens(body) == raw["max_completion_tokens"]
        if raw.get("stream_options", {}).get("include_usage"):
            assert body.stream_options.include_usage
        if raw.get("tools") and raw.get("tool_choice", "auto") != "none":
            plan = tool_plan(body)
            assert [t["name"] for t in plan.tools] == [t["function"]["name"] for t in raw["tools"]]
            assert compile_grammar(output_schema(plan, None, set()), "tools") is not None
