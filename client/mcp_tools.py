"""The MCP face of ``AgentMemory``: tool schemas, annotations and error sentences.

Every argument carries a ``description`` and the server's bounds in its JSON
schema, so a model sees the limits before it calls; arguments that break them
come back as one sentence naming the argument and what to change, not pydantic's
report. Imported only when ``apcm mcp`` runs (it needs the ``mcp`` package).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field, ValidationError

from .agent_memory import (
    BANK_NAME_PATTERN,
    DEFAULT_BANK_CAPACITY,
    FORGET_MIN_SCORE,
    ID_PATTERN,
    MAX_BANK_CAPACITY,
    MAX_KEY_CHARS,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_VALUE_CHARS,
    MAX_TEXT_CHARS,
    MAX_TOP_K,
    RECALL_MIN_SCORE,
    AgentMemory,
    ToolFailure,
)

INSTRUCTIONS = (
    "A long-term memory. Call `remember` to store a fact, preference or event worth "
    "keeping (one self-contained sentence per memory, with metadata such as user or "
    "session when known). Call `recall` with a natural-language question before "
    "answering anything that may depend on earlier conversations; it returns only "
    "memories similar enough to matter, so an empty list means nothing relevant is "
    "stored. `forget` deletes one memory by key or id (or one that a query restates "
    "closely); it first shows what it would delete and deletes only with confirm=true."
)

BankName = Annotated[str, Field(pattern=BANK_NAME_PATTERN, max_length=64)]
Bank = Annotated[BankName | None, Field(
    description="Memory bank to use (1-64 letters, digits, '_', '.', '-'); leave out for "
    "the default bank.")]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS)]
MetaKey = Annotated[str, Field(min_length=1, max_length=MAX_METADATA_KEY_CHARS)]
MetaValue = Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)]
Labels = Annotated[dict[MetaKey, MetaValue], Field(max_length=MAX_METADATA_ENTRIES)]

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


class MemoryMCPServer(MCPServer):
    """An ``MCPServer`` whose argument errors are one sentence telling the model what
    to fix (pydantic's text, with its URLs, reaches no model)."""

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            if isinstance(e.__cause__, ValidationError):
                raise ToolError(argument_advice(name, e.__cause__)) from e.__cause__
            raise


def _problem(error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "the arguments"
    ctx, kind = error.get("ctx", {}), error["type"]
    got = error.get("input")
    if kind == "missing":
        return f"`{where}` is required"
    if kind in ("less_than_equal", "greater_than_equal"):
        side = "at most" if kind == "less_than_equal" else "at least"
        bound = ctx.get("le", ctx.get("ge"))
        return f"`{where}` must be {side} {bound} (got {got!r})"
    if kind == "string_too_long":
        return (f"`{where}` must be at most {ctx['max_length']} characters (got "
                f"{len(got) if isinstance(got, str) else '?'}); shorten it")
    if kind == "string_too_short":
        return f"`{where}` must not be empty"
    if kind == "too_long":
        return f"`{where}` may have at most {ctx['max_length']} entries; drop some"
    if kind == "string_pattern_mismatch":
        return f"`{where}` has the wrong form (it must match {ctx['pattern']})"
    if kind == "literal_error":
        return f"`{where}` must be one of {ctx['expected']} (got {got!r})"
    return f"`{where}` is invalid ({error['msg'].lower()})"


def argument_advice(tool: str, error: ValidationError) -> str:
    """One sentence: which arguments of ``tool`` are wrong and how to fix them."""
    problems = "; ".join(dict.fromkeys(_problem(e) for e in error.errors()))
    return f"Invalid arguments for {tool}: {problems}. Fix them and call {tool} again."


def build_mcp(memory: AgentMemory) -> MemoryMCPServer:
    """The MCP server exposing ``memory``'s tools."""
    mcp = MemoryMCPServer("apcm-memory", instructions=INSTRUCTIONS)

    def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ToolFailure as e:
            raise ToolError(str(e)) from e

    @mcp.tool(description="Store one memory: a self-contained sentence (a fact, preference, "
              "event or decision). Remembering with an existing key replaces that memory; a "
              "full bank evicts its least-used memory.",
              annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False, open_world_hint=False))
    def remember(
        text: Annotated[Text, Field(description="The memory, written so it makes sense "
                                    "without the conversation.")],
        bank: Bank = None,
        key: Annotated[Key | None, Field(description="Optional stable id; remembering with "
                                         "an existing key replaces that memory.")] = None,
        metadata: Annotated[Labels | None, Field(description="Optional string labels, e.g. "
                                                 '{"user": "u1", "kind": "preference"}; '
                                                 "recall can filter on them.")] = None,
    ) -> dict[str, Any]:
        return guarded(memory.remember, text, bank, key, metadata)  # type: ignore[no-any-return]

    @mcp.tool(description="Find the stored memories that best answer a question or topic, "
              "best first, each with its similarity (cosine, -1..1) and id. Memories less "
              "similar than min_score are left out: an empty list means nothing relevant "
              "is stored.", annotations=READ_ONLY)
    def recall(
        query: Annotated[Text, Field(description="What you want to know, in natural "
                                     "language.")],
        bank: Bank = None,
        top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K, description="Most memories to "
                                    "return.")] = 5,
        min_score: Annotated[float, Field(ge=-1.0, le=1.0, description=(
            f"Leave out memories less similar than this. The default ({RECALL_MIN_SCORE}) "
            "drops unrelated memories; lower it (e.g. 0.2) only to see weak matches."))]
        = RECALL_MIN_SCORE,
        filter: Annotated[Labels | None, Field(  # noqa: A002
            description='Only memories whose metadata has all these labels, e.g. '
            '{"user": "u1"}.')] = None,
        mode: Annotated[Literal["hybrid", "dense", "lexical"] | None, Field(description=(
            'Leave out (hybrid: words and meaning); "lexical" for exact names, ids or rare '
            'words only; "dense" for meaning only.'))] = None,
        context: Annotated[int | None, Field(ge=0, le=8, description=(
            "Set 1 or 2 when the bank holds a conversation stored one turn per memory: "
            "each hit then comes with the turns just before and after it (before, after) "
            "and turns next to a good match rank higher. Leave out for banks of separate "
            "facts (0 turns it off; left out, the bank's own setting applies)."))] = None,
    ) -> list[dict[str, Any]]:
        return guarded(memory.recall, query, bank, top_k,  # type: ignore[no-any-return]
                       filter, mode, context, min_score)

    @mcp.tool(description="Delete one memory, named by its key or id, or the single memory "
              f"a query restates closely (similarity {FORGET_MIN_SCORE} or more). Without "
              "confirm=true nothing is deleted: the reply shows what would be.",
              annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=True, open_world_hint=False))
    def forget(
        key: Annotated[Key | None, Field(description="The key of the memory to delete.")]
        = None,
        id: Annotated[str | None, Field(  # noqa: A002
            pattern=ID_PATTERN, description="The id of the memory to delete, exactly as "
            "recall returned it (e.g. '12:345').")] = None,
        query: Annotated[Text | None, Field(description=(
            "A restatement of the memory to delete (used only when key and id are unknown; "
            "a query that matches no memory closely deletes nothing)."))] = None,
        bank: Bank = None,
        confirm: Annotated[bool, Field(description="false (default): only show what would "
                                       "be deleted; true: delete it.")] = False,
    ) -> dict[str, Any]:
        return guarded(memory.forget, key, query, bank, id,  # type: ignore[no-any-return]
                       confirm)

    @mcp.tool(description="Create a memory bank (a separate store, e.g. one per user or "
              "project); an existing bank is left as it is.",
              annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=True, open_world_hint=False))
    def create_bank(
        name: Annotated[BankName, Field(description="Bank name: 1-64 letters, digits, '_', "
                                        "'.', '-', starting with a letter or digit.")],
        capacity: Annotated[int, Field(ge=1, le=MAX_BANK_CAPACITY, description=(
            "Most memories it holds; when full, the least-used memory is evicted."))]
        = DEFAULT_BANK_CAPACITY,
    ) -> dict[str, Any]:
        return guarded(memory.create_bank, name, capacity)  # type: ignore[no-any-return]

    @mcp.tool(description="List the memory banks with how many memories each holds.",
              annotations=READ_ONLY)
    def list_banks() -> list[dict[str, Any]]:
        return guarded(memory.list_banks)  # type: ignore[no-any-return]

    return mcp
