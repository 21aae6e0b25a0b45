"""Pure translation between OpenAI requests and what the node's llama.cpp driver runs (no I/O).

Messages: `developer` is a `system` message; content parts are joined (text parts only: the node's models
have no vision, so an image part is refused with a 400 that says so); every system message goes first, as
chat templates want; `tool` results become user turns that name the call they answer; an assistant turn
that called tools shows the calls in the tool format below; consecutive turns of one role are merged, so
templates that insist on alternating roles accept any valid OpenAI conversation.

Tools: the node offers tools to any local model with one format, llama.cpp's generic one for models whose
template has no tool syntax of its own: the tool list goes into the system prompt and a grammar makes the
model answer with exactly one JSON object, `{"tool_call": {"name", "arguments"}}` or `{"response": ...}`,
which is parsed back into `tool_calls` or `content`. So a tool call is always well-formed JSON naming a
tool that exists. Models this node does not run itself (a peer's, a cloud model) get a 400 for tools.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from pinkybrain.node.openai.errors import OpenAIError
from pinkybrain.node.openai.schema import ChatCompletionRequest, ChatMessage, ResponseFormat

TEXT_PARTS = ("text", "input_text", "refusal")
IMAGE_PARTS = ("image_url", "input_image", "image")
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


# -- request bodies -----------------------------------------------------------------------------------
def parse_body(raw: bytes, cls: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"We could not parse the JSON body of your request: {exc}",
                          code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in UNION_TAGS and not part[0].isupper():
            out += ("." if out else "") + part
        # else: a union member's tag ("str", "list[...]", a model's class name), not a field name
    return out


def validation_error(exc: ValidationError) -> OpenAIError:
    first = exc.errors()[0]
    param = _param(tuple(first["loc"]))
    if first["type"] == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter")
    value = first.get("input")
    shown = json.dumps(value)[:80] if isinstance(value, (int, float, str, bool)) else "the value given"
    return OpenAIError(400, f"Invalid value for '{param}': {shown}: {first['msg']}.", param=param,
                       code="invalid_value")


def requested_max_tokens(body) -> int | None:
    return getattr(body, "max_completion_tokens", None) or body.max_tokens


def refuse_unsupported(body) -> None:
    """Fields that would change the answer and that the node cannot honour: a clear 400, never ignored."""
    if (body.n or 1) > 1 or (getattr(body, "best_of", None) or 1) > 1:
        param = "n" if (body.n or 1) > 1 else "best_of"
        raise OpenAIError(400, f"'{param}' greater than 1 is not supported: this node generates one choice "
                               "per request; send several requests instead.", param=param, code="unsupported_value")
    if body.logit_bias:
        raise OpenAIError(400, "'logit_bias' is not supported: token ids are model-specific and this node "
                               "serves several models.", param="logit_bias", code="unsupported_parameter")
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise OpenAIError(400, "'stop' takes at most 4 sequences.", param="stop", code="invalid_value")


def refuse_logprobs(body, model: str) -> None:
    wants = getattr(body, "logprobs", None)
    if wants or getattr(body, "top_logprobs", None):
        raise OpenAIError(400, f"'logprobs' is not available for model {model!r}: llama.cpp computes "
                               "log-probabilities only for a model loaded with logits for every position "
                               "(n_ctx x vocabulary floats), which this node does not do.",
                          param="logprobs", code="unsupported_parameter")


# -- messages --------------------------------------------------------------------------------------
@dataclass
class Conversation:
    messages: list[dict]  # {"role": "system"|"user"|"assistant", "content": str}, templates' shape
    image_param: str | None = None  # where the first image part was, if any
    last_user: str = ""


def _text(message: ChatMessage, i: int, conv: Conversation) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in TEXT_PARTS:
            value = part.get(kind if kind == "refusal" else "text")
            if not isinstance(value, str):
                raise OpenAIError(400, f"messages[{i}].content[{j}] is a {kind} part without text.",
                                  param=f"messages[{i}].content[{j}]", code="invalid_value")
            texts.append(value)
        elif kind in IMAGE_PARTS:
            conv.image_param = conv.image_param or f"messages[{i}].content[{j}]"
        else:
            raise OpenAIError(400, f"messages[{i}].content[{j}] has type {kind!r}; this node reads only text "
                                   "parts.", param=f"messages[{i}].content[{j}]", code="unsupported_content")
    return "\n".join(texts)


def call_json(name: str, arguments: Any) -> str:
    return json.dumps({"tool_call": {"name": name, "arguments": arguments}}, ensure_ascii=False)


def normalize_messages(messages: list[ChatMessage]) -> Conversation:
    conv = Conversation(messages=[])
    system: list[str] = []
    turns: list[dict] = []
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        text = _text(m, i, conv)
        if m.role in ("system", "developer"):
            system.append(text)
            continue
        if m.role == "assistant":
            calls = []
            for call in m.tool_calls or []:
                call_names[call.id] = call.function.name
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except ValueError:
                    arguments = call.function.arguments
                calls.append(call_json(call.function.name, arguments))
            text = "\n".join([t for t in (text, *calls) if t])
            role = "assistant"
        elif m.role in ("tool", "function"):
            name = m.name or call_names.get(m.tool_call_id or "", "a tool")
            ref = f" {m.tool_call_id}" if m.tool_call_id else ""
            text = f"Result of the call{ref} to {name}:\n{text}"
            role = "user"
        else:
            role = "user"
            conv.last_user = text
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    if system:
        conv.messages.append({"role": "system", "content": "\n\n".join(system)})
    conv.messages += turns
    return conv


def vision_error(model: str, param: str) -> OpenAIError:
    return OpenAIError(400, f"Model {model!r} has no vision: it reads text only and cannot see the image in "
                            f"{param}. Send the request without image parts, or describe the image in text.",
                       param=param, code="image_not_supported")


# -- tools and structured output ---------------------------------------------------------------------
@dataclass
class ToolPlan:
    tools: list[dict]  # {"name", "description", "parameters"}
    choice: str  # "auto" | "required" | a tool's name
    prompt: str = ""
    schema: dict = field(default_factory=dict)


def _tool_list(body: ChatCompletionRequest) -> list[dict]:
    if body.tools:
        return [{"name": t.function.name, "description": t.function.description or "",
                 "parameters": t.function.parameters or {"type": "object", "properties": {}}} for t in body.tools]
    return [{"name": f.name, "description": f.description or "",
             "parameters": f.parameters or {"type": "object", "properties": {}}} for f in body.functions or []]


def _tool_choice(body: ChatCompletionRequest) -> str:
    choice = body.tool_choice if body.tool_choice is not None else body.function_call
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    name = choice.function.get("name") if hasattr(choice, "function") else choice.get("name")
    if not name:
        raise OpenAIError(400, "tool_choice must name a function: {\"type\": \"function\", \"function\": "
                               "{\"name\": ...}}.", param="tool_choice", code="invalid_value")
    return name


def tool_plan(body: ChatCompletionRequest) -> ToolPlan | None:
    tools = _tool_list(body)
    choice = _tool_choice(body)
    if not tools:
        if choice not in ("none", "auto"):
            raise OpenAIError(400, "tool_choice names a tool but the request has no 'tools'.",
                              param="tool_choice", code="invalid_value")
        return None
    if choice == "none":
        return None  # the caller asked for no tool call: the tools are not offered
    names = [t["name"] for t in tools]
    if choice not in ("auto", "required") and choice not in names:
        raise OpenAIError(400, f"tool_choice names {choice!r}, which is not among the tools: {', '.join(names)}.",
                          param="tool_choice", code="invalid_value")
    plan = ToolPlan(tools=tools, choice=choice)
    plan.prompt = tool_prompt(plan)
    return plan


def tool_prompt(plan: ToolPlan) -> str:
    listing = json.dumps(plan.tools, ensure_ascii=False, separators=(",", ":"))
    call = '{"tool_call": {"name": "<tool name>", "arguments": {<arguments as the tool\'s parameters say>}}}'
    if plan.choice == "auto":
        # The direct answer first: small models otherwise call a tool for a greeting.
        how = 'Answer with one JSON object and nothing else: {"response": "<your answer>"} to answer ' \
              f"directly, or, only when a tool is needed, {call} to call it."
    elif plan.choice == "required":
        how = f"Call one of these tools now. Answer with one JSON object and nothing else: {call}"
    else:
        how = f"Call the tool {plan.choice!r} now. Answer with one JSON object and nothing else: {call}"
    return f"You can call these tools (JSON list of name, description, parameters):\n{listing}\n\n{how}"


def response_schema(fmt: ResponseFormat | None) -> dict | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise OpenAIError(400, "response_format of type json_schema needs json_schema.schema.",
                          param="response_format.json_schema", code="missing_required_parameter")
    return fmt.json_schema.schema_


def output_schema(plan: ToolPlan | None, answer_schema: dict | None, usable: set[str] | None = None) -> dict | None:
    """The JSON schema the model's whole output must match (compiled to a llama.cpp grammar), or None.
    A call's arguments follow its tool's parameter schema; for tools not in `usable` (their schema has a
    construct the grammar converter lacks), any JSON object."""
    if plan is None:
        return answer_schema
    offered = [t for t in plan.tools if plan.choice in ("auto", "required") or t["name"] == plan.choice]
    calls = [{"type": "object", "properties": {
                 "name": {"const": t["name"]},
                 "arguments": t["parameters"] if usable is None or t["name"] in usable else {"type": "object"}},
              "required": ["name", "arguments"]} for t in offered]
    call = calls[0] if len(calls) == 1 else {"oneOf": calls}
    calling = {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]}
    if plan.choice != "auto":
        return calling
    answering = {"type": "object", "properties": {"response": answer_schema or {"type": "string"}},
                 "required": ["response"]}
    return {"oneOf": [answering, calling]}


def with_tool_prompt(messages: list[dict], plan: ToolPlan | None) -> list[dict]:
    if plan is None:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + plan.prompt}, *messages[1:]]
    return [{"role": "system", "content": plan.prompt}, *messages]


def _partial_response(text: str) -> str | None:
    """The text of `{"response": "...` when the output was cut before the string closed."""
    head = text.lstrip()
    for prefix in ('{"response": "', '{"response":"', '{ "response": "'):
        if head.startswith(prefix):
            body = head[len(prefix):]
            for end in range(len(body), -1, -1):
                try:
                    return json.loads('"' + body[:end] + '"')
                except ValueError:
                    continue
    return None


def parse_tool_output(text: str) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) from the model's JSON answer; the raw text when it is not the tool format."""
    try:
        data = json.loads(text)
    except ValueError:
        partial = _partial_response(text)
        return (partial if partial is not None else text), None
    if isinstance(data, dict) and isinstance(data.get("tool_call"), dict):
        call = data["tool_call"]
        arguments = call.get("arguments", {})
        return None, [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                       "function": {"name": str(call.get("name", "")),
                                    "arguments": json.dumps(arguments, ensure_ascii=False)}}]
    if isinstance(data, dict) and "response" in data:
        value = data["response"]
        return (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)), None
    return text, None


# -- sampling --------------------------------------------------------------------------------------
def sampling(body, defaults: dict) -> dict:
    """llama.cpp sampling arguments: the request's, else the specialist's (or the node's) defaults."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    out = {"max_tokens": requested_max_tokens(body) or defaults["max_tokens"],
           "temperature": defaults["temperature"] if body.temperature is None else body.temperature,
           "top_p": defaults["top_p"] if body.top_p is None else body.top_p,
           "stop": stop, "seed": body.seed,
           "presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0}
    return out


def uses_extended_features(body) -> list[str]:
    """The request's fields that only this node's own llama.cpp can honour (not a peer's or a cloud model)."""
    names = []
    for name in ("stop", "seed", "presence_penalty", "frequency_penalty", "response_format", "tools", "functions"):
        value = getattr(body, name, None)
        if value not in (None, [], "", 0, 0.0) and not (name == "response_format" and value.type == "text"):
            names.append(name)
    return names


# -- responses -------------------------------------------------------------------------------------
def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_message(content: str | None, tool_calls: list[dict] | None) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def finish_reason(raw: str | None, tool_calls: list[dict] | None) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if raw == "length" else "stop"


@dataclass
class ResponseHead:
    id: str
    model: str
    fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))

    def chat(self, message: dict, finish: str, used: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": used, "system_fingerprint": self.fingerprint}

    def chunk(self, delta: dict | None, finish: str | None = None, used: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "system_fingerprint": self.fingerprint,
               "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}]}
        if used is not None:
            out["usage"] = used
        return out

    def text(self, text: str, finish: str | None, used: dict | None = None, stream: bool = False) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "system_fingerprint": self.fingerprint,
               "choices": [] if text is None else [{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": finish}]}
        if used is not None:
            out["usage"] = used
        return out


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
