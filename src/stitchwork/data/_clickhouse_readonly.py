"""The read-only query on ClickHouse engines (chdb in-process, a ClickHouse server).

ClickHouse has no snapshot to hand the query to, so it runs on the live database, fenced four ways:

1. The text is one statement: a ``;`` anywhere but at the very end is refused before the engine sees it (chdb
   runs every statement of a multi-statement text, even behind ``EXPLAIN``).
2. The engine parses it (``EXPLAIN AST``, which runs nothing) and the tree is checked: a ``SELECT`` with no
   ``INTO OUTFILE``, ``FORMAT`` or ``SETTINGS``; no table functions (``file``, ``url``, ``s3``, ``remote``,
   ``executable``, ``input``, ``merge``, ``Python``, ``numbers``…); no functions that read files, dictionaries,
   other tables or server settings (``file``, ``dictGet…``, ``joinGet…``, ``getSetting``…); every table it names is
   one it may read, in this database (``system`` and other databases are refused), also inside ``IN``.
3. It runs with ``readonly = 1`` (no writes, no setting changes, most table functions refused by the engine
   itself), ``max_execution_time`` (the engine stops it) and ``max_result_rows``.
4. Results past ``max_rows`` are refused.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from stitchwork.errors import QueryRefused

#: Functions that reach outside the query's tables: files, dictionaries (which have sources), Join tables named
#: in a string, server settings and macros, ML models loaded from disk.
FORBIDDEN_FUNCTIONS = frozenset({
    "file", "url", "joinget", "joingetornull", "hascolumnintable", "catboostevaluate", "evalmlmethod",
    "modelevaluate", "getsetting", "getsettingordefault", "getmacro", "getserverport", "getserversetting",
    "getclienthttpheader", "filesystemavailable", "filesystemcapacity", "filesystemunreserved", "currentprofiles",
    "currentroles", "enabledprofiles", "enabledroles", "defaultroles", "defaultprofiles", "initialqueryid",
    "queryid", "currentqueryid", "addresstoline", "addresstolinewithinlines", "addresstosymbol", "demangle",
    "globalin", "globalnotin", "globalinignoreset", "globalnotinignoreset", "tcpport", "getoskernelversion",
    "hostname", "fqdn", "displayname", "getsubcolumn", "structuretocapnprotoschema", "structuretoprotobufschema",
})
FORBIDDEN_PREFIXES = ("dict", "joinget")
#: Nodes that change how the query runs or where its result goes.
FORBIDDEN_NODES = {"Set": "SETTINGS", "SetQuery": "SETTINGS", "Settings": "SETTINGS", "InsertQuery": "INSERT",
                   "ProjectionSelectQuery": "projections"}


@dataclass(frozen=True, slots=True)
class Node:
    depth: int
    kind: str
    name: str
    children: int


def single_statement(sql: str) -> str:
    """``sql`` without a trailing ``;``; refused if it holds any other ``;`` (even in a string or comment)."""
    text = sql.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text:
        raise QueryRefused("give exactly one SQL statement, got none")
    if ";" in text:
        raise QueryRefused("give exactly one SQL statement: ';' is only allowed at the end (use char(59) for the "
                           "character in a string)")
    return text


def parse_ast(lines: list[str]) -> list[Node]:
    """The nodes of an ``EXPLAIN AST`` dump (one space of indentation per level)."""
    nodes: list[Node] = []
    for line in lines:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip(" "))
        body = line.strip()
        children = 0
        if body.endswith(")") and " (children " in body:
            body, _, count = body.rpartition(" (children ")
            children = int(count.rstrip(")")) if count.rstrip(")").isdigit() else 0
        if body.endswith(")") and " (alias " in body:
            body = body.rpartition(" (alias ")[0]
        kind, _, name = body.partition(" ")
        nodes.append(Node(depth, kind, name.strip(), children))
    return nodes


def check_ast(
    nodes: list[Node], *, database: str, allowed: Collection[str], tables: Collection[str],
    databases: Collection[str],
) -> None:
    """Refuses a parsed query that could write, reach outside ``allowed`` or change how it runs.

    Args:
        nodes: The query's tree (:func:`parse_ast`).
        database: The store's database (unqualified names resolve to it).
        allowed: Tables the query may read.
        tables: Every table of ``database`` (those not allowed may not be named anywhere, even in ``IN``).
        databases: Every database of the engine (names that qualify a table or column).
    """
    if not nodes or nodes[0].kind not in ("SelectWithUnionQuery", "SelectIntersectExceptQuery"):
        kind = nodes[0].kind if nodes else "nothing"
        raise QueryRefused(f"only SELECT queries are allowed here, got {kind.removesuffix('Query') or kind}")
    if nodes[0].children != 1:
        raise QueryRefused("INTO OUTFILE, FORMAT and SETTINGS are not allowed in this query")
    permitted = {t.lower() for t in allowed}
    hidden = {t.lower() for t in tables} - permitted
    others = {d.lower() for d in databases} - {database.lower()}
    stack: list[Node] = []
    for node in nodes:
        while stack and stack[-1].depth >= node.depth:
            stack.pop()
        parent = stack[-1].kind if stack else ""
        stack.append(node)
        if node.kind in FORBIDDEN_NODES:
            raise QueryRefused(f"{FORBIDDEN_NODES[node.kind]} is not allowed in this query")
        if node.kind.startswith(("Insert", "Alter", "Create", "Drop", "Delete", "Update", "Rename", "Optimize",
                                 "System", "Kill", "Grant", "Revoke", "Use", "Watch", "Explain", "Show")):
            raise QueryRefused(f"the query may only read: it contains {node.kind}")
        if node.kind == "Function":
            name = node.name.lower()
            if parent == "TableExpression":
                raise QueryRefused(f"table functions such as {node.name}() are not allowed in this query; it may "
                                   f"read only the tables {', '.join(sorted(permitted))}")
            if name in FORBIDDEN_FUNCTIONS or name.startswith(FORBIDDEN_PREFIXES):
                raise QueryRefused(f"function {node.name}() is not allowed in this query (it reaches outside the "
                                   "audit data)")
        elif node.kind == "TableIdentifier":
            _check_table(node.name, database=database, permitted=permitted, hidden=hidden, others=others)
        elif node.kind in ("Identifier", "QualifiedAsterisk"):
            parts = [p.lower() for p in node.name.split(".") if p]
            if len(parts) > 1 and parts[0] in others:
                raise QueryRefused(f"{node.name!r}: this query may not reach database {parts[0]!r}")
            if any(p in hidden for p in parts):
                raise QueryRefused(f"{node.name!r}: the query may read only the tables {', '.join(sorted(permitted))}")


def _check_table(name: str, *, database: str, permitted: set[str], hidden: set[str], others: set[str]) -> None:
    parts = [p.lower() for p in name.split(".") if p]
    if len(parts) > 1:
        if parts[0] != database.lower() or len(parts) > 2:
            raise QueryRefused(f"table {name!r}: this query may read only the tables {', '.join(sorted(permitted))} "
                               f"of its own database")
        parts = parts[1:]
    if not parts:
        raise QueryRefused("a table with no name is not allowed")
    base = parts[0]
    if base in hidden or base in others or base in ("system", "information_schema"):
        raise QueryRefused(f"table {name!r} is not open to this query; it may read: {', '.join(sorted(permitted))}")
    # Any other name is a table it may read or the name of a WITH clause (ClickHouse resolves those first); a
    # name that is neither fails with "table does not exist".


def readonly_settings(max_rows: int, timeout_s: float) -> Mapping[str, int | float | str]:
    """The settings every read-only query runs with."""
    return {
        "readonly": 1, "max_execution_time": max(timeout_s, 0.001), "timeout_overflow_mode": "throw",
        "max_result_rows": max_rows + 1, "result_overflow_mode": "break", "max_memory_usage": 2_000_000_000,
        "allow_introspection_functions": 0,
    }
