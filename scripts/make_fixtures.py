#!/usr/bin/env python3
"""Generate grating's tiny random-weight test fixtures.

Usage (from the repository root, with the pinned packages of
scripts/requirements-fixtures.txt installed, e.g. in .venv-bench):

    python scripts/make_fixtures.py [--shared ../shared] [--out tests/fixtures]

Writes, under tests/fixtures/:
  xlm-roberta-tiny/      XLMRobertaForSequenceClassification (num_labels=1), Unigram tokenizer
  qwen3-tiny/            Qwen3ForCausalLM, tied embeddings, byte-level BPE tokenizer
  qwen3-tiny-untied/     Qwen3ForCausalLM, separate lm_head
  qwen3-template-ids.json  Qwen3-Reranker template ids from the REAL Qwen3 tokenizer

Every model directory holds config.json, model.safetensors (f32), tokenizer.json,
tokenizer_config.json, special_tokens_map.json and reference.jsonl (one row per
(query, document) pair, computed one pair per forward pass in f32, no padding).

Everything is deterministic: fixed seeds, single-threaded torch, and tokenizers trained
on a fixed text (the ASCII passages of the shared TREC-DL19 subset plus the text below).
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Unigram training sums scores in parallel; one thread makes the file bit-for-bit reproducible.
os.environ["RAYON_NUM_THREADS"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import (  # noqa: E402
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------
# Text used by the fixtures (written for this project).
# ---------------------------------------------------------------------------------------

LONG_BOIL = (
    "At sea level pure water boils at one hundred degrees Celsius, which is two hundred "
    "and twelve degrees Fahrenheit. The boiling point falls as air pressure drops, so on "
    "a high mountain water boils at a lower temperature and food takes longer to cook. "
    "Adding salt raises the boiling point slightly, but only by a fraction of a degree "
    "in a normal kitchen pot."
)
LONG_PLANTS = (
    "Plants make their own food through photosynthesis. Inside the green parts of the "
    "leaf, chlorophyll captures energy from sunlight and uses it to turn carbon dioxide "
    "from the air and water from the soil into sugar. Oxygen is released as a by-product. "
    "The sugar is stored as starch or used to build new cells, so the plant can grow "
    "roots, stems and flowers."
)
LONG_RAIL = (
    "The first public railway to use steam locomotives opened in the north of England "
    "in the early nineteenth century. Within a few decades lines connected most large "
    "cities, and travel times between them fell from days to hours. Railway companies "
    "also introduced standard time across the country, because every town had kept its "
    "own local time until then."
)
LONG_COLD = (
    "The common cold is a viral infection of the nose and throat. Typical symptoms are "
    "a runny or stuffy nose, sneezing, a sore throat, a mild cough and sometimes a low "
    "fever or headache. Most people recover within seven to ten days without treatment. "
    "Rest, fluids and simple pain relief can make the symptoms easier to live with "
    "while the body fights the virus."
)
MEDIUM_PHONE = (
    "Alexander Graham Bell was awarded the first patent for the telephone in 1876, "
    "although several other inventors were working on similar devices at the same time."
)

PAIRS = [
    ("what is the boiling point of water", "Water boils at 100 degrees Celsius at sea level."),
    ("what is the boiling point of water", "Boiling point chart"),
    ("what is the boiling point of water", LONG_BOIL),
    ("how do plants make food", "Plants use photosynthesis."),
    ("how do plants make food", LONG_PLANTS),
    ("how do plants make food", LONG_RAIL),
    ("who invented the telephone", "Alexander Graham Bell"),
    ("who invented the telephone", MEDIUM_PHONE),
    ("symptoms of the common cold", LONG_COLD),
    ("symptoms of the common cold", "Runny nose, sneezing.\nSore throat after a na\u00efve caf\u00e9 visit."),
]

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
OTHER_INSTRUCTION = "Given a question about science, find passages that explain the answer clearly"

QWEN_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    "and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n"
)
QWEN_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def qwen_middle(instruction, query, document):
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def qwen_template_ids(tok, instruction, query, document):
    """Prefix, middle and suffix tokenized separately, then concatenated."""
    ids = []
    for part in (QWEN_PREFIX, qwen_middle(instruction, query, document), QWEN_SUFFIX):
        ids += tok(part, add_special_tokens=False)["input_ids"]
    return ids


EXTRA_TEXT = [
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    "Note that the answer can only be yes or no.",
    "Given a web search query, retrieve relevant passages that answer the query.",
    "Is this passage relevant? yes. Is that passage relevant? no.",
    LONG_BOIL,
    LONG_PLANTS,
    LONG_RAIL,
    LONG_COLD,
    MEDIUM_PHONE,
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_corpus(path, limit):
    """ASCII-only passages of the shared corpus (keeps the tiny vocabularies compact)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if text.isascii():
                out.append(text)
                if len(out) >= limit:
                    break
    return out


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


def train_unigram(texts, vocab_size):
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
        max_piece_length=12,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer's log-probabilities differ run to run in the last bits (hash-map iteration
    # order in its sums), which also reorders near-equal pieces. Round the scores to 6
    # decimals and sort pieces by (score desc, piece) so that the file is reproducible.
    js = json.loads(tok.to_str())
    vocab = js["model"]["vocab"]
    head, rest = vocab[:4], vocab[4:]
    assert [p for p, _ in head] == ["<s>", "<pad>", "</s>", "<unk>"], head
    rest = sorted(([p, round(sc, 6)] for p, sc in rest), key=lambda ps: (-ps[1], ps[0]))
    # The trainer appends the characters it must keep, in hash order, with made-up scores
    # below every learned piece. Give that tail's scores to its pieces in code-point order.
    floor = min(sc for p, sc in rest if len(p) > 1)
    tail = [ps for ps in rest if ps[1] < floor]
    assert all(len(p) == 1 for p, _ in tail), tail
    rest = rest[: len(rest) - len(tail)] + [
        [p, sc] for p, (_, sc) in zip(sorted(p for p, _ in tail), tail)
    ]
    js["model"]["vocab"] = head + rest
    tok = Tokenizer.from_str(json.dumps(js))
    # <mask> goes last, as in XLM-R.
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0 </s>:0",
        pair="<s>:0 $A:0 </s>:0 </s>:0 $B:0 </s>:0",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tok.no_truncation()
    tok.no_padding()
    for t, i in (("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3)):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def train_byte_bpe(texts, vocab_size, shared):
    """Byte-level BPE with Qwen's own pre-tokenization (regex split + ByteLevel), read from
    the real Qwen3 tokenizer.json so the tiny tokenizer splits text the same way."""
    real = json.loads((shared / "tokenizers/qwen3/tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = real["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split", split
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split["pattern"]["Regex"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # "yes" and "no" must be single tokens (no leading space, as in Qwen: they follow a newline).
    yes_no = ["yes\nno\nYes\nNo\n"] * 200
    tok.train_from_iterator(list(texts) + yes_no, trainer=trainer)
    # Added tokens, after the trained vocabulary, with the real tokenizer's flags.
    real_added = {a["content"]: a for a in real["added_tokens"]}
    for content in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        a = real_added[content]
        at = AddedToken(
            content,
            single_word=a["single_word"],
            lstrip=a["lstrip"],
            rstrip=a["rstrip"],
            normalized=a["normalized"],
            special=a["special"],
        )
        if a["special"]:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
    tok.no_truncation()
    tok.no_padding()
    # Take normalizer, pre-tokenizer, post-processor and decoder verbatim from the real file
    # (the Python constructors do not expose every flag of the decoder).
    js = json.loads(tok.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        js[key] = real[key]
    tok = Tokenizer.from_str(json.dumps(js))
    for w in ("yes", "no"):
        assert tok.token_to_id(w) is not None, f"{w!r} is not a single token"
        assert tok.encode(w).ids == [tok.token_to_id(w)], w
    return tok


def save_hf_tokenizer(tok, out_dir, kind):
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable by AutoTokenizer."""
    tok.save(str(out_dir / "tokenizer.json"))
    added = {}
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        added[str(i)] = {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
    if kind == "xlmr":
        special = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "cls_token": "<s>",
            "mask_token": "<mask>",
        }
        cfg = dict(special)
        cfg.update(
            {
                "added_tokens_decoder": added,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 256,
                "tokenizer_class": "XLMRobertaTokenizer",
            }
        )
    else:
        special = {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        }
        cfg = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 512,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def check_auto_tokenizer(out_dir, raw, samples, pair):
    """AutoTokenizer must load the directory and encode exactly like the raw tokenizer."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out_dir))
    for q, d in samples:
        if pair:
            a = hf(q, d)["input_ids"]
            b = raw.encode(q, d).ids
        else:
            a = hf(d, add_special_tokens=False)["input_ids"]
            b = raw.encode(d, add_special_tokens=False).ids
        assert a == b, (out_dir, q, d, a, b)
    return hf


# ---------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def randomize(model, seed, linear_std, emb_std, bias_std=0.1, out_std=None):
    """Large-variance init so that scores differ clearly between documents."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = p.shape
        if "norm" in name.lower() and name.endswith("weight"):
            p.copy_(torch.empty(shape).uniform_(0.6, 1.4, generator=g))
        elif name.endswith("bias"):
            p.copy_(torch.randn(shape, generator=g) * bias_std)
        elif "embed" in name:
            p.copy_(torch.randn(shape, generator=g) * emb_std)
        elif out_std is not None and ("out_proj" in name or "lm_head" in name):
            p.copy_(torch.randn(shape, generator=g) * out_std)
        else:
            p.copy_(torch.randn(shape, generator=g) * linear_std)


def check_f32_safetensors(path, model):
    sd = load_file(str(path))
    for k, v in sd.items():
        assert v.dtype == torch.float32, (k, v.dtype)
    return sorted(sd)


def patch_config(out_dir, extra):
    """Add keys to config.json (classic spellings that other loaders expect)."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(extra)
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


def make_xlmr(out_dir, texts, seed):
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = train_unigram(texts, vocab_size=500)
    save_hf_tokenizer(tok, out_dir, "xlmr")
    check_auto_tokenizer(out_dir, tok, PAIRS, pair=True)

    max_pos = 258  # 256 usable positions: ids start at pad_token_id + 1 = 2
    cfg = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=max_pos,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=None,
        initializer_range=0.02,
    )
    cfg._attn_implementation = "eager"
    model = XLMRobertaForSequenceClassification(cfg).eval()
    randomize(model, seed, linear_std=0.2, emb_std=1.0, out_std=0.5)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    names = check_f32_safetensors(out_dir / "model.safetensors", model)
    patch_config(out_dir, {"position_embedding_type": "absolute", "tie_word_embeddings": False})
    model = XLMRobertaForSequenceClassification.from_pretrained(
        str(out_dir), attn_implementation="eager", dtype=torch.float32
    ).eval()

    rows = []
    with torch.no_grad():
        for q, d in PAIRS:
            ids = tok.encode(q, d).ids
            assert len(ids) + cfg.pad_token_id + 1 <= max_pos, ("too long for positions", len(ids))
            x = torch.tensor([ids])
            out = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
            logit = out.logits[0, 0].item()
            hs = out.hidden_states
            assert len(hs) == cfg.num_hidden_layers + 1
            layer_logits = [model.classifier(hs[l])[0, 0].item() for l in range(1, len(hs))]
            assert abs(layer_logits[-1] - logit) < 1e-6, (layer_logits[-1], logit)
            rows.append({"query": q, "document": d, "input_ids": ids, "logit": logit, "layer_logits": layer_logits})
    write_jsonl(out_dir / "reference.jsonl", rows)
    return {"vocab_size": tok.get_vocab_size(), "tensors": names, "rows": rows}


def make_qwen3(out_dir, texts, seed, layers, tied, shared, vocab_size=800):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = train_byte_bpe(texts, vocab_size=vocab_size, shared=shared)
    save_hf_tokenizer(tok, out_dir, "qwen")
    hf_tok = check_auto_tokenizer(
        out_dir, tok, [(q, d) for q, d in PAIRS] + [("", QWEN_PREFIX), ("", QWEN_SUFFIX)], pair=False
    )
    yes_id = tok.token_to_id("yes")
    no_id = tok.token_to_id("no")
    assert hf_tok.convert_tokens_to_ids("yes") == yes_id and hf_tok.convert_tokens_to_ids("no") == no_id

    cfg = Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        use_cache=False,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg._attn_implementation = "eager"
    model = Qwen3ForCausalLM(cfg).eval()
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    randomize(model, seed, linear_std=0.2, emb_std=1.0, bias_std=0.1, out_std=1.0)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    gen = out_dir / "generation_config.json"
    if gen.exists():
        gen.unlink()
    names = check_f32_safetensors(out_dir / "model.safetensors", model)
    assert ("lm_head.weight" in names) == (not tied), names
    # transformers 5 writes rope_theta inside rope_parameters; also keep the classic key.
    patch_config(out_dir, {"rope_theta": cfg.rope_parameters["rope_theta"]})

    # Reload from disk and score with the reloaded model (proves the files are complete).
    model = Qwen3ForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager", dtype=torch.float32).eval()
    W = model.get_output_embeddings().weight
    if tied:
        assert torch.equal(W, model.model.embed_tokens.weight)

    captured = {}

    def hook(_mod, _inp, out):
        captured["last"] = out[0] if isinstance(out, tuple) else out

    model.model.layers[-1].register_forward_hook(hook)

    pairs = [(DEFAULT_INSTRUCTION, q, d) for q, d in PAIRS] + [(OTHER_INSTRUCTION, PAIRS[0][0], PAIRS[0][1])]
    rows = []
    with torch.no_grad():
        for ins, q, d in pairs:
            ids = qwen_template_ids(hf_tok, ins, q, d)
            assert len(ids) <= cfg.max_position_embeddings
            x = torch.tensor([ids])
            out = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
            hs = out.hidden_states
            assert len(hs) == layers + 1
            fwd = (out.logits[0, -1, yes_id] - out.logits[0, -1, no_id]).item()
            # The last hidden state already carries the final norm; check that against the hook.
            normed_last = model.model.norm(captured["last"])[0, -1]
            assert torch.allclose(normed_last, hs[-1][0, -1], atol=1e-5, rtol=0), "hidden_states[-1] is not normed?"

            def head(h):
                return (h @ W[yes_id] - h @ W[no_id]).item()

            layer_logits = []
            for l in range(1, layers + 1):
                h = hs[l][0, -1]
                if l < layers:
                    h = model.model.norm(h)
                layer_logits.append(head(h))
            assert abs(layer_logits[-1] - fwd) < 1e-5, (layer_logits[-1], fwd)
            rows.append(
                {
                    "query": q,
                    "document": d,
                    "instruction": ins,
                    "input_ids": ids,
                    "logit": fwd,
                    "layer_logits": layer_logits,
                }
            )
    write_jsonl(out_dir / "reference.jsonl", rows)
    return {"vocab_size": tok.get_vocab_size(), "yes_id": yes_id, "no_id": no_id, "tensors": names, "rows": rows}


def make_template_ids(path, shared):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared / "tokenizers/qwen3"))
    cases = [
        (DEFAULT_INSTRUCTION, "what is the boiling point of water", "Water boils at 100 degrees Celsius at sea level."),
        (DEFAULT_INSTRUCTION, "how do plants make food", LONG_PLANTS),
        (
            DEFAULT_INSTRUCTION,
            "café culture in Zürich",
            "Ein Café in Zürich serviert Crème brûlée. 東京の喫茶店はとても静かです。 Señor Muñoz liked it \U0001F600!",
        ),
        (
            OTHER_INSTRUCTION,
            "list the steps",
            "Step one: boil water.\nStep two: add tea.\n\n  Step three: wait\tthree minutes.\n",
        ),
        (DEFAULT_INSTRUCTION, "yes or no?", "no"),
    ]
    out = []
    diffs = []
    for ins, q, d in cases:
        ids = qwen_template_ids(tok, ins, q, d)
        whole = tok(QWEN_PREFIX + qwen_middle(ins, q, d) + QWEN_SUFFIX, add_special_tokens=False)["input_ids"]
        if whole != ids:
            diffs.append((q, len(ids), len(whole)))
        out.append({"instruction": ins, "query": q, "document": d, "input_ids": ids})
    doc = {"yes_id": tok.convert_tokens_to_ids("yes"), "no_id": tok.convert_tokens_to_ids("no"), "cases": out}
    # One case per line, keys in a fixed order.
    lines = [f'{{"yes_id": {doc["yes_id"]}, "no_id": {doc["no_id"]}, "cases": [']
    lines += [
        "  " + json.dumps(c, ensure_ascii=False) + ("," if i + 1 < len(out) else "")
        for i, c in enumerate(out)
    ]
    lines.append("]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8")) == doc
    return doc, diffs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the project's shared/ folder")
    ap.add_argument("--out", default=str(REPO / "tests/fixtures"))
    ap.add_argument("--corpus-passages", type=int, default=1500)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    shared = Path(args.shared)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    texts = read_corpus(shared / "data/trec-dl19-subset/corpus.jsonl", args.corpus_passages) + EXTRA_TEXT
    texts = texts + [QWEN_PREFIX, QWEN_SUFFIX]
    log(f"training text: {len(texts)} passages")

    x = make_xlmr(out / "xlm-roberta-tiny", texts, seed=1234)
    log(f"xlm-roberta-tiny: vocab {x['vocab_size']}, logits {[round(r['logit'], 3) for r in x['rows']]}")
    q1 = make_qwen3(out / "qwen3-tiny", texts, seed=2024, layers=3, tied=True, shared=shared)
    log(f"qwen3-tiny: vocab {q1['vocab_size']} yes {q1['yes_id']} no {q1['no_id']}, "
        f"logits {[round(r['logit'], 3) for r in q1['rows']]}")
    q2 = make_qwen3(out / "qwen3-tiny-untied", texts, seed=7, layers=2, tied=False, shared=shared)
    log(f"qwen3-tiny-untied: vocab {q2['vocab_size']} yes {q2['yes_id']} no {q2['no_id']}, "
        f"logits {[round(r['logit'], 3) for r in q2['rows']]}")
    doc, diffs = make_template_ids(out / "qwen3-template-ids.json", shared)
    log(f"qwen3 real tokenizer: yes {doc['yes_id']} no {doc['no_id']}; "
        f"separate-vs-whole differences: {diffs if diffs else 'none'}")

    for p in sorted(out.rglob("*")):
        if p.is_file():
            h = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            log(f"{p.stat().st_size:>9}  {h}  {p.relative_to(out)}")


if __name__ == "__main__":
    main()
