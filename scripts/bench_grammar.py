"""The grammar libraries side by side, as they were chosen between (docs/ENGINE.md, Structured output):
the cost of one token's mask on this CPU, and how much of JSON Schema each enforces.

llguidance is what the engine uses; xgrammar and outlines-core are measured when installed
(`.venv/bin/pip install xgrammar outlines-core`; xgrammar brings triton and apache-tvm-ffi). Vocabularies:
the benchmark model's tokenizer (about 18.6k tokens) and a byte-level BPE of 128k trained here (once,
cached, a minute and a half), the size of Llama 3's. Mask time is per token along a valid instance of a
nested schema, after a first pass that warms each library's caches; the matcher is made from the
compiled grammar each library caches (llguidance: a copy of a never-advanced matcher).

    .venv/bin/python scripts/bench_grammar.py [--skip-128k]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BENCH_CACHE, bench_model_dir, machine_description, print_table  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lora_serving.container.demo.tokenizer import _SYLLABLES, build_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "code", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {"name": "the red cat", "age": 42, "color": "blue", "code": "ABC-1234", "tags": ["one", "two three"],
            "address": {"city": "river city", "zip": "12345"}}

# (feature, schema, a valid instance, an invalid one): enforced means the valid one is accepted and the
# invalid one refused; refused means the library declines the schema (which the engine turns into a 400).
COVERAGE = [
    ("enum, const", {"type": "object", "properties": {"a": {"enum": ["x", 1, None]}, "b": {"const": "k"}},
                     "required": ["a", "b"], "additionalProperties": False}, {"a": 1, "b": "k"}, {"a": 2, "b": "k"}),
    ("pattern", {"type": "string", "pattern": "^[A-Z]{2}[0-9]+$"}, "AB12", "ab12"),
    ("minLength, maxLength", {"type": "string", "minLength": 2, "maxLength": 3}, "abc", "abcd"),
    ("minimum, maximum", {"type": "integer", "minimum": 10, "maximum": 20}, 15, 25),
    ("exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 0.5, 0),
    ("minItems, maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2], [1]),
    ("$ref, $defs", {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                     "additionalProperties": False}},
                     "type": "array", "items": {"$ref": "#/$defs/p"}}, [{"x": 1}], [{"y": 1}]),
    ("recursion", {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                                   "additionalProperties": False}}, "$ref": "#/$defs/n"}, {"c": [{"c": []}]}, {"c": [1]}),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, "ab", "abc"),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     {"a": 1, "b": 2}, {"a": 1}),
    ("type list", {"type": ["string", "null"]}, None, 1),
    ("format date", {"type": "string", "format": "date"}, "2024-01-31", "yesterday"),
    ("format email", {"type": "string", "format": "email"}, "a@b.co", "nope"),
    ("format uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"}}, {"k": 1}, {"k": "v"}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                           "additionalProperties": False}, {"x1": 1}, {"y": 1}),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     [1, "a"], ["a", 1]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("optional properties", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                             "required": ["b"], "additionalProperties": False}, {"b": "x"}, {"a": 1}),
    ("minProperties", {"type": "object", "minProperties": 1}, {"a": 1}, {}),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7),
    ("not", {"type": "integer", "not": {"const": 3}}, 4, 3),
    ("if / then", {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
     {"a": 1, "b": 2}, {"a": 1}),
]


def tokenizer_128k():
    path = BENCH_CACHE / "tokenizer-128k"
    if not (path / "tokenizer.json").is_file():
        rng = random.Random(1)
        words = [" ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 5))) for _ in range(12))
                 for _ in range(400000)]
        numbers = [" ".join(str(rng.randint(0, 10**6)) + rng.choice(".,;:!?-_/{}[]()\"'") for _ in range(8))
                   for _ in range(50000)]
        build_tokenizer(path, vocab_size=128000, extra_text=words + numbers)
    return AutoTokenizer.from_pretrained(str(path))


class Library:
    """compile(schema) -> grammar; matcher(grammar); fill(matcher) -> int32 bitmask row; accept(matcher, t)."""

    def __init__(self, tokenizer) -> None:
        self.vocab_size = len(tokenizer)
        self.bitmask = torch.full(((self.vocab_size + 31) // 32,), -1, dtype=torch.int32)


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        import llguidance.hf
        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size)

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error or messages:
            raise ValueError(messages[0])
        return self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher):
        matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)

    def accept(self, matcher, token):
        return matcher.consume_token(token)

    def accepting(self, matcher):
        return matcher.is_accepting()


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        import xgrammar
        self.xgr = xgrammar
        self.compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size), max_threads=1)
        self.eos = tokenizer.eos_token_id
        self.bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True,
                                                 separators=(", ", ": "))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher):
        matcher.fill_next_token_bitmask(self.bitmask)

    def accept(self, matcher, token):
        return matcher.accept_token(token)

    def accepting(self, matcher):
        return matcher.is_terminated() or matcher.accept_token(self.eos)


class OutlinesCore(Library):
    """outlines-core compiles a schema to a regex, then the regex to an index over the vocabulary."""

    name = "outlines-core"

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        self.oc = outlines_core
        self.to_regex = build_regex_from_schema
        byte_of = _byte_level_decoder()
        vocabulary: dict[bytes, list[int]] = {}
        for text, token in tokenizer.get_vocab().items():
            if text in tokenizer.all_special_tokens:
                continue
            vocabulary.setdefault(bytes(byte_of[c] for c in text), []).append(token)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, vocabulary)

    def compile(self, schema):
        return self.oc.Index(self.to_regex(json.dumps(schema), None), self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher):
        matcher.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), 4)

    def accept(self, matcher, token):
        try:
            matcher.advance(token)
        except ValueError:
            return False
        return True

    def accepting(self, matcher):
        return matcher.is_finished()


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character map, reversed: byte-level BPE token text -> the bytes it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(character): byte for byte, character in zip(printable, characters)}


def available(tokenizer) -> list[Library]:
    libraries = []
    for library, module in ((LLGuidance, "llguidance"), (XGrammar, "xgrammar"), (OutlinesCore, "outlines_core")):
        if importlib.util.find_spec(module) is not None:
            libraries.append(library(tokenizer))
    return libraries


def mask_cost(library: Library, tokens: list[int]) -> tuple[float, float, float]:
    """(compile ms, mean us per token, max us per token), over 4 passes after a warm-up pass."""
    started = time.perf_counter()
    compiled = library.compile(SCHEMA)
    compile_ms = (time.perf_counter() - started) * 1e3
    times = []
    for repeat in range(5):
        matcher = library.matcher(compiled)
        for token in tokens:
            started = time.perf_counter()
            library.fill(matcher)
            elapsed = time.perf_counter() - started
            if repeat:
                times.append(elapsed)
            assert library.accept(matcher, token), f"{library.name} refused a token of a valid instance"
    return compile_ms, statistics.mean(times) * 1e6, max(times) * 1e6


def coverage(library: Library, tokenizer) -> tuple[int, list[str]]:
    enforced, notes = 0, []
    for feature, schema, valid, invalid in COVERAGE:
        try:
            compiled = library.compile(schema)
        except Exception:  # each library raises its own kind
            notes.append(f"{feature}: refused")
            continue
        accepts = [_accepts(library, compiled, tokenizer, json.dumps(value)) for value in (valid, invalid)]
        if accepts == [True, False]:
            enforced += 1
        else:
            notes.append(f"{feature}: {'ACCEPTS INVALID' if accepts[1] else 'REJECTS VALID'}")
    return enforced, notes


def _accepts(library: Library, compiled, tokenizer, text: str) -> bool:
    matcher = library.matcher(compiled)
    return all(library.accept(matcher, token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]) \
        and library.accepting(matcher)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-128k", action="store_true")
    args = parser.parse_args()
    print(machine_description())
    tokenizers = [("bench model", AutoTokenizer.from_pretrained(str(bench_model_dir())))]
    if not args.skip_128k:
        tokenizers.append(("128k BPE", tokenizer_128k()))
    text = json.dumps(INSTANCE)
    rows = []
    for label, tokenizer in tokenizers:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        for library in available(tokenizer):
            compile_ms, mean_us, max_us = mask_cost(library, tokens)
            rows.append([library.name, f"{label} ({len(tokenizer)})", compile_ms, mean_us, max_us])
    print(f"\nMask per token along a {len(tokens)}-token instance of a nested schema")
    print_table(["library", "vocabulary", "compile ms", "mask us mean", "mask us max"], rows)

    tokenizer = tokenizers[0][1]
    print(f"\nJSON Schema: {len(COVERAGE)} features, a valid and an invalid instance each")
    coverage_rows = []
    for library in available(tokenizer):
        enforced, notes = coverage(library, tokenizer)
        coverage_rows.append([library.name, f"{enforced}/{len(COVERAGE)}", "; ".join(notes)])
    print_table(["library", "enforced", "the others"], coverage_rows)


if __name__ == "__main__":
    main()
