"""Seeded workload generators: lists of OpenAI chat / completion requests with a known shared
structure, all made from synthetic text (no downloads).

| name                      | what repeats across requests                    | API         |
|---------------------------|-------------------------------------------------|-------------|
| system-prompt             | a long system prompt, short questions after it  | chat        |
| few-shot                  | instruction + 5 labelled examples, item last    | completions |
| rag                       | a few documents, many questions per document    | chat        |
| multi-turn                | each turn re-sends the whole conversation       | chat        |
| generated-shared-prefix   | groups x prompts x prefix x question (SGLang's) | completions |
| cache-hostile             | system-prompt's content behind a per-request id | chat        |
| agent                     | tools + system prompt, then call/result turns   | chat + tools|
| head-of-line              | nothing: short requests behind a long prefill   | both        |

The same (workload, seed, token_scale) always gives the same requests in the same order, so a
caching-off run replays exactly what the caching-on run sent. Lengths are in tokens of the
embedded model's tokenizer (see text.py); `token_scale` adapts them to another tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Any, ClassVar

from radixserve.benchmark.text import TextGenerator


@dataclass(slots=True)
class BenchRequest:
    """One request of a workload, in OpenAI wire shape (chat `messages` or completion `prompt`).

    shared_prefix is the leading content (system prompt, document, earlier turns...) this request
    shares with other requests of its `group`; shared_prefix_tokens its intended length. Requests
    of one `session` (multi-turn) must be sent in `turn` order, each after the previous finished,
    as a chat client would.
    """

    index: int
    workload: str
    group: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int = 16
    shared_prefix: str = ""
    shared_prefix_tokens: int = 0
    session: str | None = None
    turn: int = 0
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools, sent with the messages
    # Seconds after the run's start at which to send it, whatever the arrival discipline: a
    # workload whose point is its timeline (head-of-line) sets it on every request.
    send_at: float | None = None

    @property
    def api(self) -> str:
        """"chat" (/v1/chat/completions) or "completions" (/v1/completions)."""
        return "chat" if self.messages is not None else "completions"

    @property
    def content(self) -> str:
        """The request's text, messages joined (for structure checks without a tokenizer)."""
        if self.messages is not None:
            return "".join(m.get("content") or "" for m in self.messages)
        return self.prompt or ""

    def body(self, model: str, *, stream: bool = True, temperature: float = 0.0, ignore_eos: bool = True,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON body to POST. ignore_eos (a vLLM / SGLang / radixserve extension) keeps output
        lengths fixed, so throughput compares like with like; leave it off for strict servers."""
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "temperature": temperature}
        if self.messages is not None:
            body["messages"] = self.messages
            if self.tools:
                # tool_choice "none": the tools are in the prompt (and its cached prefix) but the
                # reply streams as text, so TTFT is the first token, not the end of a parsed call
                body["tools"] = self.tools
                body["tool_choice"] = "none"
        else:
            body["prompt"] = self.prompt
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if ignore_eos:
            body["ignore_eos"] = True
        body.update(extra or {})
        return body


@dataclass
class Workload:
    """Base of the generators: a seed, an output length and a length scale. Subclasses set
    `name`, `description`, `shares_prefix` and which field counts requests (`_count_field`)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    shares_prefix: ClassVar[bool] = True  # False: the negative control, expected hit rate ~0
    # What the report says about it: "shared-prefix" (hit rate, TTFT on/off), "control" (the
    # negative control), "head-of-line" (the short requests' TTFT behind a long prefill).
    kind: ClassVar[str] = "shared-prefix"
    _count_field: ClassVar[str] = "num_requests"
    _quick: ClassVar[dict[str, Any]] = {}

    seed: int = 0
    output_tokens: int = 12
    token_scale: float = 1.0

    def build(self) -> list[BenchRequest]:
        """The requests, in sending order."""
        raise NotImplementedError

    def summary(self) -> str:
        """One line: the shape of this configuration, for the report."""
        raise NotImplementedError

    def _text(self, salt: int = 0) -> TextGenerator:
        # Each part of a workload draws from its own stream, so changing one count (say, more
        # questions) leaves the shared content unchanged.
        return TextGenerator(random.Random(f"{self.name}:{self.seed}:{salt}"), self.token_scale)

    @classmethod
    def create(cls, *, quick: bool = False, scale: float = 1.0, **overrides: Any) -> Workload:
        """The default configuration (or the tiny `quick` one) with its request count times
        `scale` (at least 1), then any field overrides."""
        params = dict(cls._quick) if quick else {}
        params.update(overrides)
        workload = cls(**params)
        if scale != 1.0 and cls._count_field not in overrides:
            count = getattr(workload, cls._count_field)
            setattr(workload, cls._count_field, max(1, round(count * scale)))
        return workload


@dataclass
class SystemPromptWorkload(Workload):
    """A long shared system prompt, then a short question: the classic prefix-cache case."""

    name: ClassVar[str] = "system-prompt"
    description: ClassVar[str] = "one long system prompt shared by every request, a short question after it"
    _quick: ClassVar[dict[str, Any]] = {"num_requests": 6, "system_tokens": 256, "output_tokens": 4}

    num_requests: int = 40
    system_tokens: int = 2000
    question_tokens: int = 20
    num_system_prompts: int = 1

    def summary(self) -> str:
        return (f"{self.num_requests} requests: {self.num_system_prompts} system prompt(s) of {self.system_tokens} "
                f"tokens + ~{self.question_tokens}-token question, {self.output_tokens} output tokens")

    def _system_prompts(self) -> list[str]:
        gen = self._text(0)
        return [f"You are the assistant of service {k}. " + gen.text(self.system_tokens - 8)
                for k in range(self.num_system_prompts)]

    def build(self) -> list[BenchRequest]:
        systems = self._system_prompts()
        gen = self._text(1)
        out = []
        for i in range(self.num_requests):
            k = i % len(systems)
            question = gen.question(self.question_tokens, i + 1)
            out.append(BenchRequest(
                index=i, workload=self.name, group=f"system-{k}",
                messages=[{"role": "system", "content": systems[k]}, {"role": "user", "content": question}],
                max_tokens=self.output_tokens, shared_prefix=systems[k], shared_prefix_tokens=self.system_tokens,
            ))
        return out


@dataclass
class CacheHostileWorkload(SystemPromptWorkload):
    """The negative control: system-prompt's very requests, each with a unique id at the front of
    its system prompt, so no two prompts share even their first block."""

    name: ClassVar[str] = "cache-hostile"
    description: ClassVar[str] = "system-prompt's content with a per-request id at the front (negative control)"
    shares_prefix: ClassVar[bool] = False

    def summary(self) -> str:
        return "the same requests as system-prompt, each with a unique request id before the system prompt"

    def build(self) -> list[BenchRequest]:
        # The twin draws from system-prompt's text streams, so the content is identical.
        twin = SystemPromptWorkload(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        ids = self._text(2)
        out = []
        for req in twin.build():
            request_id = ids.hex_id()
            system = f"Request id: {request_id}. " + req.messages[0]["content"]
            out.append(BenchRequest(
                index=req.index, workload=self.name, group=f"request-{request_id}",
                messages=[{"role": "system", "content": system}, req.messages[1]],
                max_tokens=req.max_tokens, shared_prefix="", shared_prefix_tokens=0,
            ))
        return out


@dataclass
class WorkingSetWorkload(SystemPromptWorkload):
    """A working set larger than the device pool: many long system prompts, requested round
    robin, so with the device pool alone LRU evicts each one before its turn comes again. The
    tiered cache keeps them below the device (--kv-store, --host-cache-gb on a GPU). Meaningful
    with a pool of a few prompts: run it with --num-blocks (~4 prompts' worth), tiers off vs on."""

    name: ClassVar[str] = "working-set"
    description: ClassVar[str] = ("16 system prompts round robin, more than a small device pool holds "
                                  "(compare --kv-store off / disk:PATH at a fixed --num-blocks)")
    _quick: ClassVar[dict[str, Any]] = {"num_requests": 8, "system_tokens": 256, "num_system_prompts": 4,
                                        "output_tokens": 4}

    num_requests: int = 48
    num_system_prompts: int = 16


@dataclass
class FewShotWorkload(Workload):
    """A classifier prompt: fixed instruction, 5 labelled examples, the new item last."""

    name: ClassVar[str] = "few-shot"
    description: ClassVar[str] = "fixed instruction + 5 labelled examples, the new item last (completions API)"
    _quick: ClassVar[dict[str, Any]] = {"num_requests": 6, "instruction_tokens": 64, "example_tokens": 24,
                                        "output_tokens": 4}
    LABELS: ClassVar[tuple[str, ...]] = ("positive", "negative", "neutral")

    num_requests: int = 40
    instruction_tokens: int = 150
    num_examples: int = 5
    example_tokens: int = 50
    item_tokens: int = 40
    output_tokens: int = 8

    def summary(self) -> str:
        return (f"{self.num_requests} requests: {self.instruction_tokens}-token instruction + {self.num_examples} "
                f"examples of {self.example_tokens} tokens, {self.item_tokens}-token item, "
                f"{self.output_tokens} output tokens")

    def _prefix(self) -> str:
        gen = self._text(0)
        parts = ["Classify the sentiment of the text as positive, negative or neutral. "
                 + gen.text(self.instruction_tokens - 14)]
        for k in range(self.num_examples):
            parts.append(f"Text: {gen.text(self.example_tokens)}\nLabel: {self.LABELS[k % len(self.LABELS)]}")
        return "\n\n".join(parts) + "\n\n"

    def build(self) -> list[BenchRequest]:
        prefix = self._prefix()
        shared = self.instruction_tokens + self.num_examples * (self.example_tokens + 6)
        gen = self._text(1)
        return [
            BenchRequest(index=i, workload=self.name, group="classifier",
                         prompt=f"{prefix}Text: {gen.text(self.item_tokens)}\nLabel:",
                         max_tokens=self.output_tokens, shared_prefix=prefix, shared_prefix_tokens=shared)
            for i in range(self.num_requests)
        ]


@dataclass
class RAGWorkload(Workload):
    """Retrieval-augmented QA: a few documents, many questions per document, arriving mixed."""

    name: ClassVar[str] = "rag"
    description: ClassVar[str] = "a few shared documents, many questions per document, in shuffled order"
    _count_field: ClassVar[str] = "questions_per_document"
    _quick: ClassVar[dict[str, Any]] = {"num_documents": 2, "questions_per_document": 3, "document_tokens": 192,
                                        "output_tokens": 4}
    SYSTEM: ClassVar[str] = "Answer the question using only the document the user gives. Be brief."

    num_documents: int = 4
    questions_per_document: int = 10
    document_tokens: int = 1500
    question_tokens: int = 25

    def summary(self) -> str:
        return (f"{self.num_documents * self.questions_per_document} requests: {self.num_documents} documents of "
                f"{self.document_tokens} tokens x {self.questions_per_document} questions of ~{self.question_tokens} "
                f"tokens, {self.output_tokens} output tokens")

    def build(self) -> list[BenchRequest]:
        docs = self._text(0)
        documents = [f"Document {d}:\n" + docs.text(self.document_tokens) for d in range(self.num_documents)]
        gen = self._text(1)
        pairs = [(d, q) for d in range(self.num_documents) for q in range(self.questions_per_document)]
        random.Random(f"{self.name}:{self.seed}:order").shuffle(pairs)
        out = []
        for i, (d, q) in enumerate(pairs):
            question = gen.question(self.question_tokens, q + 1)
            user = f"{documents[d]}\n\n{question}"
            out.append(BenchRequest(
                index=i, workload=self.name, group=f"doc-{d}",
                messages=[{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": user}],
                max_tokens=self.output_tokens, shared_prefix=self.SYSTEM + documents[d],
                shared_prefix_tokens=self.document_tokens + 20,
            ))
        return out


@dataclass
class MultiTurnWorkload(Workload):
    """Chat sessions: every turn re-sends the whole conversation so far.

    The assistant turns are synthetic and fixed (not the model's replies), so the caching-off
    run sends exactly the same bytes; the earlier turns are what gets reused either way.
    """

    name: ClassVar[str] = "multi-turn"
    description: ClassVar[str] = "chat sessions; each turn re-sends the whole conversation (turns in order)"
    _count_field: ClassVar[str] = "num_conversations"
    _quick: ClassVar[dict[str, Any]] = {"num_conversations": 2, "turns": 3, "system_tokens": 48, "user_tokens": 32,
                                        "assistant_tokens": 24, "output_tokens": 4}

    num_conversations: int = 8
    turns: int = 5
    system_tokens: int = 150
    user_tokens: int = 60
    assistant_tokens: int = 50

    def summary(self) -> str:
        return (f"{self.num_conversations * self.turns} requests: {self.num_conversations} conversations x "
                f"{self.turns} turns ({self.system_tokens}-token system prompt, {self.user_tokens}-token user and "
                f"{self.assistant_tokens}-token assistant turns), {self.output_tokens} output tokens")

    def build(self) -> list[BenchRequest]:
        system = "You are a helpful travel assistant. " + self._text(0).text(self.system_tokens - 7)
        gen = self._text(1)
        conversations = []
        for _ in range(self.num_conversations):
            turns = []
            for t in range(self.turns):
                turns.append((f"Turn {t + 1}. " + gen.text(self.user_tokens - 4), gen.text(self.assistant_tokens)))
            conversations.append(turns)
        out = []
        for t in range(self.turns):  # round robin: turn t of every session, then turn t + 1
            for c, turns in enumerate(conversations):
                messages = [{"role": "system", "content": system}]
                for u, a in turns[:t]:
                    messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                messages.append({"role": "user", "content": turns[t][0]})
                shared = "".join(m["content"] for m in messages[:-1])
                out.append(BenchRequest(
                    index=len(out), workload=self.name, group=f"conversation-{c}", messages=messages,
                    max_tokens=self.output_tokens, shared_prefix=shared,
                    shared_prefix_tokens=self.system_tokens + t * (self.user_tokens + self.assistant_tokens + 10),
                    session=f"conversation-{c}", turn=t,
                ))
        return out


@dataclass
class GeneratedSharedPrefixWorkload(Workload):
    """SGLang's `generated-shared-prefix`: groups x prompts per group, each prompt a group's
    shared prefix then its own question, shuffled. `prefix_tokens` may list one length per
    group (cycled), which gives the TTFT-vs-prefix-length curve in one run."""

    name: ClassVar[str] = "generated-shared-prefix"
    description: ClassVar[str] = "SGLang's generated-shared-prefix: groups x prompts x prefix x question, shuffled"
    _count_field: ClassVar[str] = "prompts_per_group"
    _quick: ClassVar[dict[str, Any]] = {"num_groups": 2, "prompts_per_group": 3, "prefix_tokens": (128, 256),
                                        "question_tokens": 16, "output_tokens": 4}

    num_groups: int = 4
    prompts_per_group: int = 10
    prefix_tokens: int | tuple[int, ...] = (256, 512, 1024, 2048)
    question_tokens: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.prefix_tokens, list):
            self.prefix_tokens = tuple(self.prefix_tokens)

    def group_prefix_tokens(self, g: int) -> int:
        lengths = self.prefix_tokens if isinstance(self.prefix_tokens, tuple) else (self.prefix_tokens,)
        return lengths[g % len(lengths)]

    def summary(self) -> str:
        lengths = sorted({self.group_prefix_tokens(g) for g in range(self.num_groups)})
        return (f"{self.num_groups * self.prompts_per_group} requests: {self.num_groups} groups x "
                f"{self.prompts_per_group} prompts, prefix {'/'.join(map(str, lengths))} tokens, "
                f"question {self.question_tokens} tokens, {self.output_tokens} output tokens")

    def build(self) -> list[BenchRequest]:
        gen = self._text(0)
        prefixes = [f"Shared context {g}. " + gen.text(self.group_prefix_tokens(g) - 5) for g in range(self.num_groups)]
        questions = self._text(1)
        pairs = [(g, p) for g in range(self.num_groups) for p in range(self.prompts_per_group)]
        prompts = {pair: questions.question(self.question_tokens, pair[1] + 1) for pair in pairs}
        random.Random(f"{self.name}:{self.seed}:order").shuffle(pairs)
        return [
            BenchRequest(index=i, workload=self.name, group=f"prefix-{g}",
                         prompt=f"{prefixes[g]}\n\n{prompts[(g, p)]}", max_tokens=self.output_tokens,
                         shared_prefix=prefixes[g], shared_prefix_tokens=self.group_prefix_tokens(g))
            for i, (g, p) in enumerate(pairs)
        ]


@dataclass
class AgentWorkload(Workload):
    """A tool-using agent loop: a long system prompt and tool schemas (~3k tokens together),
    then each turn appends the assistant's tool call and the tool's result (200-1000 tokens) and
    re-sends everything; sessions interleave (turn t of every session, then turn t + 1).

    The calls and results are synthetic and fixed (as multi-turn's assistant turns), so the
    caching-off run sends exactly the same bytes. Result lengths are drawn in [200, 1000] and,
    where a session would outgrow `context_tokens` (the embedded model has 8192), the part of
    each above 200 is scaled down so that it fits.
    """

    name: ClassVar[str] = "agent"
    description: ClassVar[str] = ("an agent loop: system prompt + tool schemas (~3k tokens), each turn appends a "
                                  "tool call and a 200-1000-token result; sessions interleaved")
    _count_field: ClassVar[str] = "num_sessions"
    _quick: ClassVar[dict[str, Any]] = {"num_sessions": 2, "turns": 3, "system_tokens": 160, "num_tools": 2,
                                        "tool_description_tokens": 24, "result_tokens": (32, 64),
                                        "output_tokens": 4}
    TOOL_NAMES: ClassVar[tuple[str, ...]] = ("search_logs", "read_file", "run_query", "list_services", "get_metrics",
                                             "restart_service", "open_ticket", "send_message", "fetch_url",
                                             "get_deploys")

    num_sessions: int = 20
    turns: int = 10
    system_tokens: int = 1800
    num_tools: int = 8
    tool_description_tokens: int = 60
    result_tokens: tuple[int, int] = (200, 1000)
    context_tokens: int = 7600
    output_tokens: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.result_tokens, list):
            self.result_tokens = tuple(self.result_tokens)

    def summary(self) -> str:
        lo, hi = self.result_tokens
        return (f"{self.num_sessions * self.turns} requests: {self.num_sessions} sessions x {self.turns} turns, "
                f"{self.system_tokens}-token system prompt + {self.num_tools} tool schemas "
                f"(~{self.num_tools * (self.tool_description_tokens + 115)} tokens), a call + {lo}-{hi}-token tool "
                f"result per turn, {self.output_tokens} output tokens")

    def tools(self) -> list[dict[str, Any]]:
        gen = self._text(0)
        out = []
        for k in range(self.num_tools):
            name = self.TOOL_NAMES[k % len(self.TOOL_NAMES)] + ("" if k < len(self.TOOL_NAMES) else f"_{k}")
            out.append({"type": "function", "function": {
                "name": name,
                "description": gen.text(self.tool_description_tokens),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string", "description": gen.text(12)},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 100, "description": gen.text(8)},
                    },
                    "required": ["query"],
                },
            }})
        return out

    def _result_lengths(self, rng: random.Random) -> list[int]:
        lo, hi = self.result_tokens
        lengths = [rng.randint(lo, hi) for _ in range(self.turns - 1)]
        fixed = self.system_tokens + self.num_tools * (self.tool_description_tokens + 115) + self.output_tokens
        room = self.context_tokens - fixed - self.turns * 60  # calls, the task, template tokens
        excess = sum(n - lo for n in lengths)
        if sum(lengths) > room and excess > 0:
            f = max(0.0, (room - lo * len(lengths)) / excess)
            lengths = [lo + int((n - lo) * f) for n in lengths]
        return lengths

    def build(self) -> list[BenchRequest]:
        tools = self.tools()
        system = "You are an operations agent with tools. " + self._text(1).text(self.system_tokens - 8)
        gen = self._text(2)
        rng = random.Random(f"{self.name}:{self.seed}:lengths")
        sessions = []
        for s in range(self.num_sessions):
            task = f"Task {s + 1}: " + gen.question(30, s + 1)
            steps = []
            for t, n in enumerate(self._result_lengths(rng)):
                tool = tools[rng.randrange(len(tools))]["function"]["name"]
                call = {"id": f"call_{s}_{t}", "type": "function",
                        "function": {"name": tool, "arguments": json.dumps({"query": gen.words(8)})}}
                steps.append((call, f"Result {t + 1} of {tool}: " + gen.text(n), n))
            sessions.append((task, steps))
        out = []
        for t in range(self.turns):  # round robin: turn t of every session, then turn t + 1
            for s, (task, steps) in enumerate(sessions):
                messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                                  {"role": "user", "content": task}]
                for call, result, _ in steps[:t]:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
                shared = "".join(m["content"] for m in (messages[:-1] if t else messages[:1]))
                out.append(BenchRequest(
                    index=len(out), workload=self.name, group=f"session-{s}", messages=messages,
                    max_tokens=self.output_tokens, shared_prefix=shared,
                    shared_prefix_tokens=self.system_tokens + sum(n for _, _, n in steps[: max(t - 1, 0)]),
                    session=f"session-{s}", turn=t, tools=tools,
                ))
        return out


@dataclass
class HeadOfLineWorkload(Workload):
    """Head-of-line blocking: an uncached long prompt, then short chat requests arriving while it
    prefills. What it measures is the short requests' TTFT (report: "head-of-line"): a scheduler
    that gives a long prefill the whole token budget of every step makes them wait for all of it
    (issue #12: 25.6 s behind an 8191-token prompt); one that keeps room in each step for new
    prompts serves them within a step or two. Every request is sent at a fixed time (`send_at`),
    whatever the suite's arrival discipline. Nothing is shared, so caching on and off see the same
    work: the two runs are two measurements of the same thing. bench/bench_head_of_line.py
    measures the same case standalone, with the scheduler's room for new prompts on and off."""

    name: ClassVar[str] = "head-of-line"
    description: ClassVar[str] = "short chat requests arriving while an uncached long prompt prefills"
    shares_prefix: ClassVar[bool] = False
    kind: ClassVar[str] = "head-of-line"
    _count_field: ClassVar[str] = "num_short"
    _quick: ClassVar[dict[str, Any]] = {"long_tokens": 600, "num_short": 2, "output_tokens": 4}

    long_tokens: int = 4000
    num_short: int = 4
    question_tokens: int = 12
    delay: float = 0.5  # seconds after the long prompt that the first short request is sent
    interval: float = 0.5  # seconds between short requests
    long_output_tokens: int = 1

    def summary(self) -> str:
        return (f"{self.num_short} chat requests of ~{self.question_tokens} tokens sent {self.delay:g} s after an "
                f"uncached {self.long_tokens}-token completions prompt, {self.interval:g} s apart; "
                f"{self.output_tokens} output tokens (the long prompt: {self.long_output_tokens})")

    def build(self) -> list[BenchRequest]:
        # A random id first: the long prompt is never a prefix of anything cached (not even the
        # suite's warm-up), in either run.
        gen = self._text(1)
        long_prompt = f"[{gen.hex_id()}] " + gen.text(self.long_tokens)
        out = [BenchRequest(index=0, workload=self.name, group="long", prompt=long_prompt,
                            max_tokens=self.long_output_tokens, send_at=0.0)]
        questions = self._text(2)
        for i in range(self.num_short):
            out.append(BenchRequest(
                index=len(out), workload=self.name, group="short", max_tokens=self.output_tokens,
                messages=[{"role": "user", "content": questions.question(self.question_tokens, i + 1)}],
                send_at=self.delay + i * self.interval,
            ))
        return out


WORKLOADS: dict[str, type[Workload]] = {
    w.name: w for w in (SystemPromptWorkload, FewShotWorkload, RAGWorkload, MultiTurnWorkload,
                        GeneratedSharedPrefixWorkload, CacheHostileWorkload, AgentWorkload, HeadOfLineWorkload,
                        WorkingSetWorkload)
}


# What `radixserve bench suite` runs unless --workloads says otherwise: `agent` is opt-in (its
# caching-off run prefills ~1M tokens, tens of minutes on a CPU), and so is `working-set` (it
# measures the tiers, and only means something with a pool smaller than its 16 prompts).
DEFAULT_WORKLOADS: tuple[str, ...] = tuple(name for name in WORKLOADS if name not in ("agent", "working-set"))


def make_workload(name: str, *, seed: int = 0, token_scale: float = 1.0, quick: bool = False, scale: float = 1.0,
                  **overrides: Any) -> Workload:
    """A workload by name (see WORKLOADS) with its default (or `quick`) sizes."""
    try:
        cls = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None
    return cls.create(quick=quick, scale=scale, seed=seed, token_scale=token_scale, **overrides)


__all__ = [
    "BenchRequest", "Workload", "WORKLOADS", "DEFAULT_WORKLOADS", "make_workload", "SystemPromptWorkload", "CacheHostileWorkload",
    "FewShotWorkload", "RAGWorkload", "MultiTurnWorkload", "GeneratedSharedPrefixWorkload", "AgentWorkload",
    "HeadOfLineWorkload",
    "WorkingSetWorkload",
]
