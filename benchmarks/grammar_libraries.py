"""Grammar libraries for structured outputs, side by side: xgrammar, llguidance, outlines-core.

For each library and each vocabulary: the one-off tokenizer setup, the time to compile a JSON schema (three
schemas, a fresh compiler each, so no cache helps), and the cost per decode step of filling the token masks of
64 constrained sequences, each writing its own document of one schema: on one thread (what the engine's loop
thread pays) and with the library's batch API on 2 threads where it has one.

Vocabularies: the embedded SmolLM2's (49,152 tokens), and a Qwen2-sized one (151,665 tokens, masks 151,936 wide
as Qwen2/Qwen3's LM head) built from it, since no Qwen tokenizer is on disk: SmolLM2's byte-level BPE extended
with merges of random pairs of its own tokens (seeded), so the extra tokens are real byte strings of the same
alphabet and tokenization still works.

    python benchmarks/grammar_libraries.py [--sequences 64] [--libs xgrammar,llguidance,outlines-core]
                                           [--vocabs 49k,152k] [--install-times]

--install-times also times `pip install --no-deps --no-cache-dir --target TMP` of each library (and
xgrammar's apache-tvm-ffi; its torch, transformers, triton are the ones already installed), touching nothing
installed."""

import argparse
import copy
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import PreTrainedTokenizerFast

from nanovllm.loader import default_model_path, load_tokenizer

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "required": ["id", "status", "customer", "items", "total"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "status": {"enum": ["pending", "paid", "shipped"]},
            "customer": {
                "type": "object",
                "required": ["name", "email"],
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "email": {"type": "string"},
                    "vip": {"type": "boolean"},
                },
            },
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 5,
                "items": {
                    "type": "object",
                    "required": ["sku", "qty", "price"],
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price": {"type": "number", "minimum": 0},
                    },
                },
            },
            "total": {"type": "number", "minimum": 0},
        },
    },
    "wide": {
        "type": "object",
        "required": [f"f{i}" for i in range(24)],
        "properties": {
            f"f{i}": [
                {"type": "string"},
                {"type": "integer", "minimum": -5, "maximum": 500},
                {"type": "boolean"},
                {"type": "array", "items": {"type": "number"}},
                {"enum": ["x", "y", "z"]},
                {"anyOf": [{"type": "string"}, {"type": "null"}]},
            ][i % 6]
            for i in range(24)
        },
    },
}


def nested_instance(rng: random.Random) -> dict:
    """A valid document of SCHEMAS["nested"], different for each sequence (so their matchers are in different
    states at each step, as in a real batch)."""
    name = rng.choice(["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov"])
    return {
        "id": rng.randint(1, 99999),
        "status": rng.choice(["pending", "paid", "shipped"]),
        "customer": {"name": name, "email": name.split()[0].lower() + "@example.com", "vip": rng.random() < 0.5},
        "items": [
            {
                "sku": "".join(rng.choice("ABCDEFGHIJ") for _ in range(3)) + f"-{rng.randint(0, 9999):04d}",
                "qty": rng.randint(1, 99),
                "price": round(rng.uniform(0, 500), 2),
            }
            for _ in range(rng.randint(1, 3))
        ],
        "total": round(rng.uniform(0, 2000), 2),
    }


# ---- the vocabularies --------------------------------------------------------------------------------------
def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    return load_tokenizer(default_model_path())


def qwen_sized_tokenizer(base: PreTrainedTokenizerFast, size: int = 151_643, seed: int = 0) -> PreTrainedTokenizerFast:
    """base's byte-level BPE grown to `size` regular tokens (Qwen2 has 151,643 and 22 special ones) by seeded merges
    of its own tokens that keep to the token classes of Qwen2's pre-tokenizer, as a trained vocabulary does: a
    word (letters after at most one other character) + letters, or a punctuation run + punctuation. (Merges
    across those classes, e.g. `the":{`, never occur in a real vocabulary and would make every library's masks
    far costlier.) base's special tokens keep their ids."""
    import re

    from tokenizers import Tokenizer

    spec = json.loads(base.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    to_byte = byte_level_alphabet()

    def text(piece: str) -> str | None:
        try:
            return bytes(to_byte[c] for c in piece).decode()
        except (KeyError, UnicodeDecodeError):
            return None

    classes = {
        "word": re.compile(r"[^\r\n\w]?[^\W\d_]+"),
        "letters": re.compile(r"[^\W\d_]+"),
        "punct": re.compile(r" ?[^\s\w]+"),
        "punct_tail": re.compile(r"[^\s\w]+"),
    }
    pieces = {k: [p for p in vocab if (t := text(p)) is not None and r.fullmatch(t)] for k, r in classes.items()}
    rng = random.Random(seed)
    while len(vocab) < size:
        head, tail = ("word", "letters") if rng.random() < 0.98 else ("punct", "punct_tail")
        a, b = rng.choice(pieces[head]), rng.choice(pieces[tail])
        if a + b not in vocab and len(text(a + b)) <= 16:
            vocab[a + b] = len(vocab)
            merges.append([a, b] if isinstance(merges[0], list) else f"{a} {b}")
            pieces[head].append(a + b)
            if head == "word" and classes["letters"].fullmatch(text(a + b)):
                pieces["letters"].append(a + b)
    for i in range(22 - len(spec["added_tokens"])):  # Qwen2's 22 specials after the regular tokens
        spec["added_tokens"].append(
            {
                "id": len(vocab) + i,
                "content": f"<|extra_{i}|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    tok.eos_token = base.eos_token
    return tok


# ---- the libraries: setup(tokenizer, width) -> state; compile(state, schema) -> grammar;
#      matcher(state, grammar); fill(matchers, bitmask) on one thread; fill_par (2 threads) or None; accept --------
def xgrammar_lib():
    import xgrammar as xgr

    def setup(tok, width):
        return {"info": xgr.TokenizerInfo.from_huggingface(tok, vocab_size=width), "batch": xgr.BatchGrammarMatcher(2)}

    def compile_(state, schema):
        return xgr.GrammarCompiler(state["info"], max_threads=1, cache_enabled=False).compile_json_schema(
            json.dumps(schema)
        )

    def fill(matchers, bitmask):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    return {
        "version": version("xgrammar"),
        "setup": setup,
        "compile": compile_,
        "matcher": lambda state, g: xgr.GrammarMatcher(g),
        "fill": fill,
        "fill_par": lambda state, ms, bm: state["batch"].batch_fill_next_token_bitmask(ms, bm),
        "accept": lambda m, t: m.accept_token(t),
    }


def llguidance_lib():
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    def setup(tok, width):
        return {"tok": llguidance.hf.from_tokenizer(tok, width), "executor": llguidance.LLExecutor(2)}

    def compile_(state, schema):  # llguidance builds its lexer lazily: creating the matcher is the compile
        m = llguidance.LLMatcher(state["tok"], llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
        assert not m.is_error(), m.get_error()
        return schema

    def matcher(state, schema):
        return llguidance.LLMatcher(state["tok"], llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))

    def fill(matchers, bitmask):
        for i, m in enumerate(matchers):
            lt.fill_next_token_bitmask(m, bitmask, i)

    return {
        "version": version("llguidance"),
        "setup": setup,
        "compile": compile_,
        "matcher": matcher,
        "fill": fill,
        "fill_par": lambda state, ms, bm: lt.fill_next_token_bitmask_par(
            state["executor"], [(m, i) for i, m in enumerate(ms)], bm
        ),
        "accept": lambda m, t: m.consume_token(t),
    }


def outlines_core_lib():
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import fill_next_token_bitmask

    def setup(tok, width):  # byte-level BPE strings -> the bytes they stand for
        decode = byte_level_alphabet()
        tokens: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i != tok.eos_token_id and not text.startswith("<|"):
                tokens.setdefault(
                    bytes(decode[c] for c in text) if all(c in decode for c in text) else text.encode(), []
                ).append(i)
        return {"vocab": oc.Vocabulary(tok.eos_token_id, tokens)}

    def fill(matchers, bitmask):
        for i, m in enumerate(matchers):
            fill_next_token_bitmask(m, bitmask[i : i + 1])

    return {
        "version": version("outlines-core"),
        "setup": setup,
        "compile": lambda state, schema: oc.Index(build_regex_from_schema(json.dumps(schema)), state["vocab"]),
        "matcher": lambda state, index: oc.Guide(index),
        "fill": fill,
        "fill_par": None,
        "accept": lambda m, t: m.advance(t) is not None,
    }


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def version(dist: str) -> str:
    from importlib.metadata import version as v

    return v(dist)


LIBS = {"xgrammar": xgrammar_lib, "llguidance": llguidance_lib, "outlines-core": outlines_core_lib}


# ---- the measurements ----------------------------------------------------------------------------------------
def mask_steps(lib: dict, state, grammar, docs: list[list[int]], width: int, par: bool) -> list[float]:
    """Seconds per step to fill every sequence's mask, over the steps the shortest document lasts; after each fill
    every sequence accepts its document's next token (checked to be allowed)."""
    matchers = [lib["matcher"](state, grammar) for _ in docs]
    bitmask = torch.full((len(docs), (width + 31) // 32), -1, dtype=torch.int32)
    times = []
    for step in range(min(len(d) for d in docs)):
        t = time.perf_counter()
        if par:
            lib["fill_par"](state, matchers, bitmask)
        else:
            lib["fill"](matchers, bitmask)
        times.append(time.perf_counter() - t)
        for i, (m, doc) in enumerate(zip(matchers, docs)):
            token = doc[step]
            assert (int(bitmask[i, token // 32]) >> (token % 32)) & 1, f"token {token} of sequence {i} masked out"
            assert lib["accept"](m, token), f"token {token} of sequence {i} refused"
    return times


def measure(name: str, tok, width: int, sequences: int) -> dict:
    lib = LIBS[name]()
    t = time.perf_counter()
    state = lib["setup"](tok, width)
    row = {"library": f"{name} {lib['version']}", "setup_s": time.perf_counter() - t}
    for schema_name, schema in SCHEMAS.items():
        t = time.perf_counter()
        lib["compile"](state, schema)  # timed only
        row[f"compile_{schema_name}_ms"] = (time.perf_counter() - t) * 1e3
    rng = random.Random(0)
    docs = [
        tok(json.dumps(nested_instance(rng), separators=(",", ":")), add_special_tokens=False).input_ids
        for _ in range(sequences)
    ]
    row["steps"] = min(len(d) for d in docs)
    serial = mask_steps(lib, state, grammar_of(lib, state), docs, width, par=False)
    row["mask_1thread_ms"] = statistics.mean(serial) * 1e3
    row["mask_1thread_max_ms"] = max(serial) * 1e3
    if lib["fill_par"]:
        row["mask_2threads_ms"] = (
            statistics.mean(mask_steps(lib, state, grammar_of(lib, state), docs, width, par=True)) * 1e3
        )
    return row


def grammar_of(lib: dict, state):
    return lib["compile"](state, SCHEMAS["nested"])


def install_times() -> dict[str, float]:
    packages = {
        "xgrammar": ["xgrammar", "apache-tvm-ffi"],
        "llguidance": ["llguidance"],
        "outlines-core": ["outlines-core"],
    }
    out = {}
    for name, pkgs in packages.items():
        with tempfile.TemporaryDirectory() as target:
            t = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-deps",
                    "--no-cache-dir",
                    "--target",
                    target,
                    *pkgs,
                ],
                check=True,
            )
            out[name] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--vocabs", default="49k,152k")
    ap.add_argument("--install-times", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = smollm2_tokenizer()
    vocabs = {"49k": (base, 49_152)}
    if "152k" in args.vocabs:
        vocabs["152k"] = (qwen_sized_tokenizer(copy.deepcopy(base)), 151_936)
    installs = install_times() if args.install_times else {}
    cols = [
        "library",
        "vocab",
        "install_s",
        "setup_s",
        *[f"compile_{s}_ms" for s in SCHEMAS],
        "steps",
        "mask_1thread_ms",
        "mask_1thread_max_ms",
        "mask_2threads_ms",
    ]
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols), flush=True)
    for vocab in args.vocabs.split(","):
        tok, width = vocabs[vocab]
        for name in args.libs.split(","):
            row = {
                "vocab": f"{vocab} ({len(tok)})",
                "install_s": installs.get(name, "-"),
                **measure(name, tok, width, args.sequences),
            }
            print(
                "| "
                + " | ".join(f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
