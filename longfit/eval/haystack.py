"""Haystack text sources for the synthetic tasks: noise lines, stdlib prose, word lists. No torch.

Nothing is downloaded. The "essay" haystack (RULER uses Paul Graham's essays) is prose taken at run time from the
docstrings of the installed Python standard library: source files are parsed with ``ast`` in sorted path order
(never imported), paragraphs that read like prose are kept, and the result is cached for the process. Files are
read lazily, so a 4k-token haystack parses a handful of modules, not the whole library. The text therefore
depends on the Python version, but is identical across runs on one machine.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import random
import re
import sys
import sysconfig
import uuid
import warnings
from collections.abc import Iterator, Sequence

# RULER's `repeat` haystack line; also the filler of the passkey task (landmark attention / KIVI / Quest).
NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def word_list(text: str) -> tuple[str, ...]:
    """Whitespace-separated words of ``text`` as a tuple."""
    return tuple(text.split())


# Word lists (longfit's own; RULER draws from the `wonderwords` package, which longfit does not depend on).
ADJECTIVES: tuple[str, ...] = word_list(
    """able absent abundant acidic adorable afraid agile alert ancient angry anxious arctic aromatic ashamed awake
    balmy bashful bitter bland blissful bold bouncy brave breezy brief bright brisk broad bumpy calm careful cautious
    charming cheerful chilly chubby clever cloudy clumsy coastal colossal cozy crisp crooked curious curly damp dapper
    daring dazzling decent deep delicate dense dizzy dreary dusty eager early earnest elated elderly elegant empty
    enormous exotic faint fancy fearless feeble festive fierce flaky flat fluffy foggy fragile frail frantic fresh
    friendly frosty frozen fuzzy gentle giant gifted gleaming glossy golden graceful grand greasy greedy grumpy hairy
    handsome happy hardy harsh hasty hazy healthy hearty heavy helpful hidden hollow honest humble hungry icy idle
    jagged jolly joyful juicy keen kind lavish lazy lean little lively lonely loud lucky lumpy mellow merry messy
    mighty misty modern modest moist narrow nervous nimble noble noisy odd ornate patient peaceful perfect plain
    pleasant plucky polite proud purple quaint quick quiet radiant rapid rare rough round royal rusty salty sandy
    scarce shaggy shallow sharp shiny short shy silent silly sleepy slender slim slow small smooth snowy soft solid
    sour sparkling spicy spotless square stable steady sticky stormy strange striped strong sturdy subtle sunny sweet
    swift tall tame tender tense thick thin thirsty tidy tiny tired tough tranquil tricky tropical vast velvet vibrant
    vivid warm wary wealthy weary whimsical wide wild windy wise witty wooden worried young zany zealous"""
)
NOUNS: tuple[str, ...] = word_list(
    """acorn actor airport album alley anchor ankle apple apron arch arena arrow artist attic avenue badge bagel
    bakery balcony bamboo banana banjo barn basket battery beach beacon bean bear beard bell belt bench berry bicycle
    blanket blossom boat bonnet book boot bottle boulder bowl bracelet branch bread breeze brick bridge broom bubble
    bucket buffalo bugle bundle butter button cabin cactus cake camel camera canal candle canoe canyon captain carpet
    carrot castle cattle cave cellar chair chalk channel cheese cherry chimney circus cliff clock cloud coat coconut
    coffee comet compass cookie copper coral cottage cotton crayon creek cricket crown crystal cupboard curtain cushion
    daisy dancer deer desert desk diamond dinner doctor dolphin donkey drawer drum duck eagle easel elbow elephant
    engine falcon farm feather fence ferry fig finger flag flame flute forest fork fossil fountain fox frog galaxy
    garden garlic gate giraffe glacier glove goat grape guitar hammer harbor harp hawk hedge helmet hill honey horse
    hotel island ivory jacket jam jar jelly jewel journal jungle kettle kitchen kite kitten ladder lake lamp lantern
    lawn lemon letter library lighthouse lily lion lizard lobster locket magnet mango map marble market meadow melon
    mirror monkey moon mountain muffin museum needle nest notebook ocean office olive onion orchard otter owl paddle
    palace panda parrot pasta peach peanut pearl pebble pencil penguin pepper piano picnic pillow pilot pine planet
    plate plum pocket pond poppy potato pumpkin puppy puzzle quilt rabbit radio rainbow raven ribbon river robin
    rocket roof saddle sailor salad sandal satellite scarf school scooter seal shadow shell ship shoe shovel singer
    skate sled snail spoon squirrel statue stone storm stream street sugar summit sunset swan table teacher teapot
    temple tent thunder tiger toast tomato tower tractor train treasure trumpet tulip tunnel turtle umbrella valley
    vase village violin volcano wagon walnut waterfall whale wheel window wizard wolf yacht zebra"""
)
VERBS: tuple[str, ...] = word_list(
    """accept admire advise agree allow answer arrange arrive attach attend avoid bake balance bathe behave believe
    blink boil borrow bounce breathe build calculate carry carve catch challenge chase cheer chew clap climb collect
    comb compare complain count crawl cross cycle dance decide deliver depend describe design dig discover divide drag
    draw dress drift earn educate employ encourage enjoy escape examine exercise explain explore fasten fetch fix
    float fold follow forgive gather gaze glow grab greet grin guard guess guide hang harvest heal hike hop hover hug
    hunt hurry imagine improve inform inspect invent invite jog juggle kneel knit knock laugh launch learn lift listen
    march measure melt mend mumble nod notice obey offer organize paint pause peel perform plant polish pour prefer
    print promise protect pull push race reach relax remember repair reply rescue rinse roll rush sail scatter scrub
    search serve settle sew shake shiver sing skip slide smile sneeze sort spill splash sprint squeeze stack stare
    steer stir stitch stretch study suggest supply surprise swim swing talk taste teach tease thank tickle travel
    tumble twist unfold unlock vanish visit wander wash watch wave weigh whisper whistle wink wish wobble wonder worry
    wrap write yawn yell"""
)

# Directories of the standard library that hold tests, demos, vendored code or generated data rather than docstrings.
_SKIPPED_DIRECTORIES = frozenset(
    {"idlelib", "site-packages", "dist-packages", "turtledemo", "pydoc_data", "__pycache__", "lib-dynload"}
)
# Imported only when the library ships without sources (frozen or .pyc-only installs); all import side-effect free.
_FALLBACK_MODULES = word_list(
    "argparse abc ast asyncio base64 bisect calendar codecs collections configparser contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fractions ftplib functools gettext heapq hmac html http.client imaplib "
    "inspect io ipaddress itertools json locale logging mailbox numbers optparse os pathlib pickle pprint queue "
    "random re sched secrets shlex shutil smtplib socket sqlite3 statistics string struct subprocess tarfile "
    "tempfile textwrap threading timeit tokenize traceback typing unittest urllib.parse urllib.request uuid "
    "warnings weakref xml.dom.minidom zipfile"
)
_PROSE_WORD = re.compile(r"[(\"']?[A-Za-z][a-z]*[,.;:)\"']*")
_CODE_MARKS = re.compile(r"[{}\[\]=<>\\`_|@]|::|\(\)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_VOCAB_WORD = re.compile(r"\b[a-z]{4,12}\b")


def prose_paragraph(docstring_paragraph: str) -> str | None:
    """Return the paragraph on one line if it reads like English prose, else None.

    Keeps paragraphs of at least 8 words that start upper-case, end with a period, are ASCII, are at least 80%
    plain words, and hold no code marks (doctest prompts, reST directives, brackets, ``=``, underscores).
    """
    lines = [line.strip() for line in docstring_paragraph.strip().splitlines()]
    if not lines or any(
        line.startswith((">>>", "...", "$", "%", ":", "..", "-", "*", "+", "|", "#")) for line in lines
    ):
        return None
    text = " ".join(" ".join(lines).split())
    words = text.split()
    if len(words) < 8 or not text.isascii() or not text.endswith(".") or not text[0].isupper():
        return None
    if sum(1 for word in words if _PROSE_WORD.fullmatch(word)) < 0.8 * len(words) or _CODE_MARKS.search(text):
        return None
    return text


def _docstrings_in_source_order(node: ast.AST) -> Iterator[str]:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        docstring = ast.get_docstring(node, clean=True)
        if docstring:
            yield docstring
    for child in getattr(node, "body", ()):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try)):
            yield from _docstrings_in_source_order(child)


class _StdlibDocstrings:
    """Lazily parsed prose paragraphs of the standard library, in sorted source-path order (a fixed prefix)."""

    def __init__(self) -> None:
        self._sources: list[str] | None = None
        self._next_source = 0
        self.paragraphs: list[str] = []
        self.sentences: list[str] = []
        self.num_chars = 0
        self._vocabulary: tuple[str, ...] | None = None

    def _source_list(self) -> list[str]:
        if self._sources is None:
            root = sysconfig.get_paths()["stdlib"]
            found: list[str] = []
            for directory, subdirectories, files in os.walk(root):
                subdirectories[:] = [
                    name
                    for name in subdirectories
                    if name not in _SKIPPED_DIRECTORIES
                    and not name.startswith(("test", "config-"))
                    and not name.endswith("tests")
                ]
                found += [os.path.join(directory, name) for name in files if name.endswith(".py")]
            # NOTE: sort by the path relative to the root with "/" separators so the order is the same everywhere.
            found.sort(key=lambda path: os.path.relpath(path, root).replace(os.sep, "/"))
            # Without sources (frozen / .pyc-only installs) fall back to importing a fixed list of modules.
            self._sources = found if found else ["module:" + name for name in _FALLBACK_MODULES]
        return self._sources

    def _docstrings_of(self, source: str) -> list[str]:
        if source.startswith("module:"):
            return _imported_docstrings(source.removeprefix("module:"))
        try:
            with open(source, "rb") as handle:
                data = handle.read()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences warn on newer Pythons
                tree = ast.parse(data)
        except (OSError, SyntaxError, ValueError):
            return []
        return list(_docstrings_in_source_order(tree))

    def load(self, min_chars: int) -> bool:
        """Parse more sources until ``min_chars`` characters of prose are held; False once the library is exhausted."""
        sources = self._source_list()
        while self.num_chars < min_chars:
            if self._next_source >= len(sources):
                return False
            for docstring in self._docstrings_of(sources[self._next_source]):
                for raw in re.split(r"\n\s*\n", docstring):
                    paragraph = prose_paragraph(raw)
                    if paragraph is not None:
                        self.paragraphs.append(paragraph)
                        self.sentences.extend(_SENTENCE_END.split(paragraph))
                        self.num_chars += len(paragraph) + 2
            self._next_source += 1
        return True

    def load_sentences(self, min_count: int) -> bool:
        while len(self.sentences) < min_count:
            if not self.load(self.num_chars + 20_000):
                return len(self.sentences) >= min_count
        return True

    def vocabulary(self) -> tuple[str, ...]:
        """Distinct lower-case words of 4 to 12 letters in all of the prose, sorted (parses the whole library)."""
        if self._vocabulary is None:
            self.load(sys.maxsize)
            self._vocabulary = tuple(sorted({word for text in self.paragraphs for word in _VOCAB_WORD.findall(text)}))
        return self._vocabulary


def _imported_docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - any import failure just means this fallback module is skipped
        return []
    found = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        member = getattr(module, name)
        if not name.startswith("_") and getattr(member, "__module__", None) == module.__name__:
            found.append(inspect.getdoc(member) or "")
    return [text for text in found if text]


_DOCS = _StdlibDocstrings()


def stdlib_paragraphs(min_chars: int) -> list[str]:
    """The shortest prefix of the stdlib prose paragraphs holding at least ``min_chars`` characters (joined by a
    blank line), or all of them when the library holds less."""
    _DOCS.load(min_chars + 2)
    joined, count = -2, 0  # length of "\n\n".join(paragraphs[:count])
    for paragraph in _DOCS.paragraphs:
        if joined >= min_chars:
            break
        joined += len(paragraph) + 2
        count += 1
    return _DOCS.paragraphs[:count]


def stdlib_prose_chars() -> int:
    """Characters of prose the whole standard library provides (parses all of it once)."""
    _DOCS.load(sys.maxsize)
    return _DOCS.num_chars


def essay_units(num_sentences: int) -> list[str]:
    """The first ``num_sentences`` sentences of the stdlib prose; repeated from the start if the library is short."""
    if num_sentences <= 0:
        return []
    if not _DOCS.load_sentences(num_sentences):
        if not _DOCS.sentences:
            raise RuntimeError("no docstring prose found in the Python standard library; use the noise haystack")
        repeats = -(-num_sentences // len(_DOCS.sentences))
        return (_DOCS.sentences * repeats)[:num_sentences]
    return _DOCS.sentences[:num_sentences]


def noise_units(num_lines: int) -> list[str]:
    """``num_lines`` copies of RULER's noise line."""
    return [NOISE_SENTENCE] * max(0, num_lines)


def common_word_tiers() -> tuple[tuple[str, ...], ...]:
    """Word pools for common-words extraction, in the order they are used: the bundled noun / adjective / verb
    lists first (sorted, unique), then, only if more are needed, the stdlib prose vocabulary minus those."""
    bundled = set(ADJECTIVES) | set(NOUNS) | set(VERBS)
    return tuple(sorted(bundled)), tuple(word for word in _DOCS.vocabulary() if word not in bundled)


def bundled_word_count() -> int:
    """Number of distinct words in the bundled lists (the first tier of ``common_word_tiers``) without parsing."""
    return len(set(ADJECTIVES) | set(NOUNS) | set(VERBS))


# ---- random values (RULER niah.py: 7-digit numbers, adjective-noun words, version-4 UUIDs) -------------------------


def random_number(rng: random.Random, num_digits: int = 7) -> str:
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def random_word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


RANDOM_VALUES = {"numbers": random_number, "words": random_word, "uuids": random_uuid}


def random_value(kind: str, rng: random.Random) -> str:
    """A random needle key or value of ``kind`` ("numbers", "words" or "uuids")."""
    try:
        return RANDOM_VALUES[kind](rng)
    except KeyError:
        raise ValueError(f"needle type must be one of {sorted(RANDOM_VALUES)}, got {kind!r}") from None


# ---- assembly ------------------------------------------------------------------------------------------------------


def insert_items(units: Sequence[str], items: Sequence[tuple[int, str]]) -> tuple[list[str], list[int]]:
    """Insert ``items`` (position, text) into ``units``: an item at position p goes before unit p (p = len(units)
    appends). Items at the same position keep their given order. Returns the pieces and the piece index of
    each item, in the order of ``items``."""
    order = sorted(range(len(items)), key=lambda i: (items[i][0], i))
    pieces: list[str] = []
    where = [0] * len(items)
    start = 0
    for i in order:
        position = min(max(items[i][0], 0), len(units))
        pieces.extend(units[start:position])
        start = max(start, position)
        where[i] = len(pieces)
        pieces.append(items[i][1])
    pieces.extend(units[start:])
    return pieces, where


def join_with_offsets(
    pieces: Sequence[str], separator: str, marked: Sequence[int], base: int = 0
) -> tuple[str, list[list[int]]]:
    """Join ``pieces`` with ``separator``; also return [start, end) character offsets (plus ``base``) of the pieces
    whose indices are in ``marked``, in that order."""
    starts, cursor = [], base
    for piece in pieces:
        starts.append(cursor)
        cursor += len(piece) + len(separator)
    return separator.join(pieces), [[starts[i], starts[i] + len(pieces[i])] for i in marked]
