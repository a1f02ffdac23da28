"""Long real text for perplexity, built at run time from the installed Python standard library. No torch.

Prose paragraphs of the stdlib docstrings (see ``haystack``), in sorted source order, joined by blank lines. The
text is deterministic for one Python installation and needs no download, so the full cache and every compressed
run score exactly the same tokens (StreamingLLM ``eval_long_ppl.py``-style long-window perplexity).
"""

from __future__ import annotations

from longfit.eval import haystack


def long_text(min_chars: int) -> str:
    """At least ``min_chars`` characters of stdlib prose: the shortest whole-paragraph prefix that long.

    Raises:
        ValueError: if ``min_chars`` < 1 or the installed standard library holds less prose than asked for.
    """
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars}")
    text = "\n\n".join(haystack.stdlib_paragraphs(min_chars))
    if len(text) < min_chars:
        raise ValueError(
            f"min_chars must be <= {len(text)} (all the docstring prose this Python's standard library holds), "
            f"got {min_chars}"
        )
    return text


def available_chars() -> int:
    """How many characters ``long_text`` can return at most (parses the whole standard library once)."""
    return len("\n\n".join(haystack.stdlib_paragraphs(haystack.stdlib_prose_chars())))
