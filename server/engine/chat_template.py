"""Chat templates: find the model's Jinja template and render conversations with it, safely.

Templates come from the model repository (or a GGUF file), so they are untrusted code that
runs on every chat request. We render them the way Hugging Face transformers'
`apply_chat_template` does (same Jinja options, globals and filters, so a prompt is
byte-for-byte what the model was trained on) inside a sandbox that is stricter than Jinja's:

* `jinja2.sandbox.ImmutableSandboxedEnvironment`: no underscore attributes (`__class__`,
  `__globals__`, ...), no mutation of lists/dicts, no Python internals; an unsafe attribute
  raises at once instead of rendering as an empty value;
* a step budget: every loop iteration and every call counts, so nested loops, recursive
  macros or loops over huge ranges stop with an error instead of hanging the server;
* size checks before the operations that can blow up memory in one step (`'x' * n`, `**`,
  `%`/`format` widths, padding methods, `tojson(indent=n)`, ...) and on the output;
* the data the template sees is rebuilt from plain JSON types (as transformers does).

Every failure, from a syntax error to `raise_exception(...)` in the template, surfaces as
`ChatTemplateError` naming the template's source, which the HTTP layer turns into a 400.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import re
import string
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes, pass_context, pass_eval_context
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.filters import make_attrgetter
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from modeldeploy.server.engine.errors import ChatTemplateError

#: Keys holding a message's reasoning; transformers copies it under all names templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render. Real templates use a tiny fraction of each."""

    max_steps: int = 1_000_000  # loop iterations + calls
    max_chars: int = 8 * 1024 * 1024  # any single string or list built, and the output
    max_total_chars: int = 64 * 1024 * 1024  # all strings the checked operations build
    max_width: int = 10_000  # padding / indent / format widths
    max_seconds: float = 2.0


class TemplateBudgetError(SecurityError):
    """The template exceeded a render limit (steps, size or time)."""


class _Budget:
    """Per-render counters, reached by the sandbox hooks through a context variable."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps_left = limits.max_steps
        self.deadline = time.monotonic() + limits.max_seconds
        self.total_chars = 0

    def tick(self, steps: int = 1) -> None:
        self.steps_left -= steps
        if self.steps_left < 0:
            raise TemplateBudgetError(
                f"more than {self.limits.max_steps} loop iterations and calls"
            )
        if self.steps_left & 1023 < steps and time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"rendering took more than {self.limits.max_seconds} s")

    def check_chars(self, n: int) -> None:
        """Refuse a string of `n` characters, or one that takes the render past its total."""
        if n > self.limits.max_chars:
            raise TemplateBudgetError(
                f"a string of {n} characters exceeds the limit of {self.limits.max_chars}"
            )
        self.total_chars += n
        if self.total_chars > self.limits.max_total_chars:
            raise TemplateBudgetError(
                f"the template built more than {self.limits.max_total_chars} characters"
            )

    def check_output(self, n: int) -> None:
        """Refuse output longer than the single-string limit (not counted twice in the total)."""
        if n > self.limits.max_chars:
            raise TemplateBudgetError(
                f"output of {n} characters exceeds the limit of {self.limits.max_chars}"
            )

    def check_width(self, n: Any) -> None:
        if isinstance(n, (int, float)) and abs(n) > self.limits.max_width:
            raise TemplateBudgetError(f"width {n} exceeds the limit of {self.limits.max_width}")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "chat_template_budget", default=None
)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # a template object used outside ChatTemplate.render
        raise SecurityError("chat templates render only through ChatTemplate.render")
    return budget


# ---------------------------------------------------------------------------------------------
# the sandbox

_GUARD_ITER = "_modeldeploy_guard_iter"
_GUARD_CONCAT = "_modeldeploy_guard_concat"
_FORMAT_SPEC_NUMBER = re.compile(r"\d+")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class _GuardLoops(NodeTransformer):
    """Route every `{% for %}` iterable and every `~` concatenation through a budget check."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _GUARD_ITER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        items = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(items, _GUARD_CONCAT, [], [], None, None, lineno=node.lineno)


@pass_context  # pass_context also keeps Jinja from running it at compile time
def _guard_iter(_context: Any, iterable: Any) -> Iterator[Any]:
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


@pass_context
def _guard_concat(_context: Any, parts: list[Any]) -> str:
    budget = _budget()
    pieces = [str(p) for p in parts]
    budget.check_chars(sum(len(p) for p in pieces))
    return "".join(pieces)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it
    (for training masks); rendering just emits the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself (as transformers)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """`namespace()` that refuses underscore names, so it cannot shadow Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: Any) -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox plus the budget and size checks described above."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limits: RenderLimits) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        )
        self.limits = limits
        self.globals.pop("lipsum", None)  # lipsum(n=10**9) is a one-call memory bomb
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
        )
        self.filters.update(
            {
                _GUARD_ITER: _guard_iter,
                _GUARD_CONCAT: _guard_concat,
                "tojson": _tojson,
                "center": _bounded_filter(self.filters["center"], "width"),
                "indent": _bounded_filter(self.filters["indent"], "width", per_line=True),
                "wordwrap": _bounded_filter(self.filters["wordwrap"], "width"),
                "slice": _bounded_filter(self.filters["slice"], "slices"),
                "format": _format_filter,
                "replace": _replace_filter,
                "join": _join_filter,
            }
        )

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _GuardLoops().visit(super()._parse(source, name, filename))

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe"
        )

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick(_MACRO_STEPS if isinstance(__obj, Macro) else 1)
        args = _precheck_call(budget, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, str):
            budget.check_chars(len(result))
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    budget.check_chars(_weight(seq) * max(n, 0))
            ints = isinstance(left, int) and isinstance(right, int)
            if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise TemplateBudgetError("integer product is too large")
        elif operator == "**":
            ints = isinstance(left, int) and isinstance(right, int)
            big = ints and abs(left) > 1 and right > 0
            if big and right * math.log2(abs(left)) > _MAX_INT_BITS:
                raise TemplateBudgetError(f"{left} ** {right} is too large")
        elif operator == "+":
            if isinstance(left, str) and isinstance(right, str):
                budget.check_chars(len(left) + len(right))
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                budget.check_chars(_weight(left) + _weight(right))
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(budget, left)
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, str):
            budget.check_chars(len(result))
        return result

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            _check_brace_format(budget, template)
            result = wrapped(*args, **kwargs)
            budget.check_chars(len(result))
            return result

        return checked


def _weight(value: Any, depth: int = 0) -> int:
    """Characters plus items in a value: what serializing it could cost (shared references
    counted every time, since that is what `tojson` or `~` would write)."""
    if isinstance(value, str):
        return len(value)
    if depth > 8:
        return 1
    if isinstance(value, (list, tuple)):
        return len(value) + sum(_weight(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return len(value) + sum(
            _weight(k, depth + 1) + _weight(v, depth + 1) for k, v in value.items()
        )
    return 1


#: Integers a template may build (enough for any arithmetic a prompt needs).
_MAX_INT_BITS = 4096

#: A macro call costs about as much as this many loop iterations.
_MACRO_STEPS = 16

_PADDING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})


def _precheck_call(budget: _Budget, obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Refuse str method calls whose result would be huge, before they allocate it.

    Returns the arguments to call with: `str.join` gets its iterable as a list, so its size
    can be known beforehand.
    """
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return args
    if name in _PADDING_METHODS:
        for value in (*args, *kwargs.values()):
            budget.check_width(value)
    elif name == "replace" and len(args) >= 2:
        _check_replace(budget, owner, args[0], args[1])
    elif name == "join" and len(args) == 1:
        parts = list(_guard_iter(None, args[0]))  # counted like a loop
        total = len(owner) * max(len(parts) - 1, 0)
        total += sum(len(p) for p in parts if isinstance(p, str))
        budget.check_chars(total)
        return (parts,)
    return args


def _check_replace(budget: _Budget, text: str, old: Any, new: Any) -> None:
    if isinstance(old, str) and isinstance(new, str):
        slots = len(text) + 1 if old == "" else len(text) // max(len(old), 1)
        budget.check_chars(len(text) + slots * len(new))


def _check_percent_format(budget: _Budget, fmt: str) -> None:
    for match in _PERCENT_SPEC.finditer(fmt):
        for part in match.groups():
            if part == "*":
                raise TemplateBudgetError("'*' widths in % formatting are not allowed")
            if part:
                budget.check_width(int(part))


def _check_brace_format(budget: _Budget, fmt: str) -> None:
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # format() itself reports the malformed string
    for _, _, spec, _ in fields:
        if spec:
            if "{" in spec:
                raise TemplateBudgetError("nested format specs are not allowed")
            for number in _FORMAT_SPEC_NUMBER.findall(spec):
                budget.check_width(int(number))


def _bounded_filter(func: Any, arg_name: str, *, per_line: bool = False) -> Any:
    """Wrap a builtin filter so its size argument (first after the value, or by name) is bounded.

    With `per_line`, the width is added to every line (`indent`), so the output size is
    checked before the filter runs.
    """
    offset = 2 if hasattr(func, "jinja_pass_arg") else 1  # pass_environment/eval_context

    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        width = args[offset] if len(args) > offset else kwargs.get(arg_name)
        budget.check_width(width)
        if per_line and isinstance(width, int):
            text = str(args[offset - 1])
            budget.check_chars(len(text) + (text.count("\n") + 1) * width)
        result = func(*args, **kwargs)
        if isinstance(result, str):
            budget.check_chars(len(result))
        return result

    if hasattr(func, "jinja_pass_arg"):
        bounded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: no HTML escaping, non-ASCII kept, optional indent."""
    budget = _budget()
    budget.check_width(indent)
    result = json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    budget.check_chars(len(result))
    return result


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    budget = _budget()
    text = str(value)
    _check_percent_format(budget, text)
    result = text % (kwargs or args)
    budget.check_chars(len(result))
    return result


def _replace_filter(value: Any, old: Any, new: Any, count: int | None = None) -> str:
    budget = _budget()
    text, old, new = str(value), str(old), str(new)
    _check_replace(budget, text, old, new)
    return text.replace(old, new, -1 if count is None else count)


@pass_eval_context
def _join_filter(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    """Jinja's `join`, with the result size checked before it is built."""
    items = list(value)
    if attribute is not None:
        getter = make_attrgetter(eval_ctx.environment, attribute)
        items = [getter(item) for item in items]
    pieces = [str(item) for item in items]
    sep = str(d)
    _budget().check_chars(sum(map(len, pieces)) + len(sep) * max(len(pieces) - 1, 0))
    return sep.join(pieces)


# ---------------------------------------------------------------------------------------------
# the template


class ChatTemplate:
    """A model's chat template (one, or several named ones), compiled once and rendered often."""

    def __init__(
        self,
        templates: str | Mapping[str, str],
        source: str,
        *,
        limits: RenderLimits | None = None,
        strict: bool = False,
    ) -> None:
        """Compile `templates`; `source` names where they came from in every error.

        With `strict`, a template that does not compile raises ChatTemplateError now (used for
        the operator's `--chat-template` file); otherwise the error is kept and raised by each
        `render`, so a model with a broken template still serves completions.
        """
        self.source = source
        self.limits = limits or RenderLimits()
        self._env = _BoundedSandbox(self.limits)
        named = {"default": templates} if isinstance(templates, str) else dict(templates)
        if not named:
            raise ChatTemplateError(f"chat template from {source}: no template in it")
        self.texts: dict[str, str] = named
        self._compiled: dict[str, jinja2.Template] = {}
        self._errors: dict[str, ChatTemplateError] = {}
        for name, text in named.items():
            label = source if len(named) == 1 else f"{source} ({name})"
            try:
                self._compiled[name] = self._env.from_string(text)
            except TemplateSyntaxError as exc:
                error = ChatTemplateError(
                    f"chat template from {label} does not compile: line {exc.lineno}: {exc.message}"
                )
                if strict:
                    raise error from exc
                self._errors[name] = error

    @property
    def names(self) -> list[str]:
        """The template names (["default"] for a single template)."""
        return list(self.texts)

    @classmethod
    def load(
        cls,
        model_dir: Path | None,
        gguf_metadata: Mapping[str, Any] | None,
        override_file: Path | str | None,
    ) -> ChatTemplate | None:
        """The chat template to use, or None when the model has none.

        Order: `override_file` (`--chat-template`; a Jinja file, or JSON with "chat_template");
        then in `model_dir` `chat_template.jinja`, `chat_template.json`, `tokenizer_config.json`
        (a string or a list of {"name", "template"}), as transformers looks them up; then the
        GGUF's `tokenizer.chat_template` (plus `tokenizer.chat_template.<name>` ones).
        """
        if override_file is not None:
            path = Path(override_file)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ChatTemplateError(f"--chat-template {path}: cannot read it ({exc})") from exc
            templates: Any = text
            if path.suffix == ".json":
                templates = _templates_from_json(path, text, key_required=False)
            return cls(templates, f"--chat-template {path}", strict=True)
        if model_dir is not None:
            model_dir = Path(model_dir)
            jinja_file = model_dir / "chat_template.jinja"
            if jinja_file.is_file():
                return cls(_read_text(jinja_file), str(jinja_file))
            for name in ("chat_template.json", "tokenizer_config.json"):
                path = model_dir / name
                if path.is_file():
                    found = _templates_from_json(path, _read_text(path), key_required=True)
                    if found is not None:
                        return cls(found, str(path))
        meta = gguf_metadata or {}
        templates = {}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            templates["default"] = meta["tokenizer.chat_template"]
        prefix = "tokenizer.chat_template."
        for key, value in meta.items():
            if key.startswith(prefix) and isinstance(value, str):
                templates[key[len(prefix) :]] = value
        if templates:
            return cls(templates, "GGUF metadata tokenizer.chat_template")
        return None

    def render(
        self,
        messages: list[Mapping[str, Any]],
        *,
        tools: list[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        bos_token: str | None = None,
        eos_token: str | None = None,
        template_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (OpenAI-style dicts), as apply_chat_template renders it.

        `kwargs` reach the template as variables (e.g. `documents`, `enable_thinking`). Special
        tokens that are None stay undefined, as transformers leaves them. Raises
        ChatTemplateError naming the template for any failure, including limits.
        """
        name = self._pick(template_name, tools)
        label = self.source if len(self.texts) == 1 else f"{self.source} ({name})"
        if name in self._errors:
            raise self._errors[name]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError(
                f"chat template from {label}: messages must be a list of objects"
            )
        variables: dict[str, Any] = {
            "messages": _alias_reasoning(_plain(messages)),
            "tools": _plain(tools),
            "documents": _plain(kwargs.pop("documents", None)),
            "add_generation_prompt": bool(add_generation_prompt),
        }
        if bos_token is not None:
            variables["bos_token"] = bos_token
        if eos_token is not None:
            variables["eos_token"] = eos_token
        variables.update(_plain(kwargs))
        budget = _Budget(self.limits)
        token = _BUDGET.set(budget)
        try:
            out: list[str] = []
            size = 0
            for chunk in self._compiled[name].generate(**variables):
                size += len(chunk)
                budget.check_output(size)
                out.append(chunk)
            return "".join(out)
        except ChatTemplateError:
            raise
        except TemplateBudgetError as exc:
            raise ChatTemplateError(f"chat template from {label} refused: {exc}") from None
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template from {label} refused: {exc}") from None
        except RecursionError:
            raise ChatTemplateError(f"chat template from {label}: recursion too deep") from None
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template from {label}: {exc.message or exc}") from None
        except MemoryError:
            raise ChatTemplateError(f"chat template from {label}: out of memory") from None
        except Exception as exc:  # a template bug meeting this input (TypeError, KeyError, ...)
            reason = f"{type(exc).__name__}: {exc}"
            raise ChatTemplateError(f"chat template from {label} failed: {reason}") from None
        finally:
            _BUDGET.reset(token)

    def _pick(self, template_name: str | None, tools: Any) -> str:
        """transformers' choice among named templates: asked-for, tool_use with tools, default."""
        if template_name is not None:
            if template_name not in self.texts:
                raise ChatTemplateError(
                    f"chat template from {self.source} has no template named {template_name!r} "
                    f"(it has: {', '.join(self.texts)})"
                )
            return template_name
        if len(self.texts) == 1:
            return next(iter(self.texts))
        if tools and "tool_use" in self.texts:
            return "tool_use"
        if "default" in self.texts:
            return "default"
        raise ChatTemplateError(
            f"chat template from {self.source} has no 'default' template "
            f"(it has: {', '.join(self.texts)})"
        )


# ---------------------------------------------------------------------------------------------
# helpers


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"chat template file {path}: cannot read it ({exc})") from exc


def _templates_from_json(path: Path, text: str, *, key_required: bool) -> Any:
    """The template(s) in a JSON file: {"chat_template": str | [{"name", "template"}]}."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also the int-digit limit
        raise ChatTemplateError(f"chat template file {path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and "chat_template" in data:
        value = data["chat_template"]
    elif not key_required and isinstance(data, (str, list)):
        value = data
    else:
        if key_required:
            return None
        raise ChatTemplateError(f'chat template file {path}: no "chat_template" key')
    if value is None and key_required:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise ChatTemplateError(
        f"chat template file {path}: chat_template must be a string or a list of "
        '{"name", "template"} objects'
    )


def _plain(value: Any) -> Any:
    """A copy built from JSON types only, so templates cannot reach methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic request models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """Copy a message's reasoning under every name templates read (as transformers does)."""
    out = []
    for message in messages:
        reasoning = next(
            (message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out
