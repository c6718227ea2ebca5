"""OpenAI's cursor pages: a list object whose items a client continues with `after=<the last id it saw>`."""

from collections.abc import Callable


def after(items: list, cursor: str | None, key: Callable = lambda item: item["id"]) -> list:
    """The items after the one whose id is `cursor`: all of them without a cursor, none after an unknown one."""
    if cursor is None:
        return items
    return items[next((i + 1 for i, item in enumerate(items) if key(item) == cursor), len(items)):]


def page(items: list[dict], cursor: str | None, limit: int) -> dict:
    """The list object of at most `limit` items after the cursor."""
    rest = after(items, cursor)
    shown = rest[:limit]
    return {"object": "list", "data": shown, "has_more": len(rest) > limit,
            "first_id": shown[0]["id"] if shown else None, "last_id": shown[-1]["id"] if shown else None}
