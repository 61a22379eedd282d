from collections import Counter

import pytest

from cpet import data, io
from cpet.errors import DataError


def _examples():
    rows = [{"text": f"a{i}", "label": "a"} for i in range(300)]
    rows += [{"text": f"b{i}", "label": "b"} for i in range(100)]
    rows += [{"text": "dup", "label": "a"}, {"text": "dup", "label": "a"}]
    rows += [{"text": "conflict", "label": "a"}, {"text": "conflict", "label": "b"}]
    return rows


def test_dedupe_keeps_first_and_drops_conflicts():
    kept, dropped = data.dedupe(_examples())
    texts = [r["text"] for r in kept]
    assert texts.count("dup") == 1 and "conflict" not in texts
    assert dropped == 3


def test_split_is_stratified_deterministic_capped_and_disjoint():
    kept, _ = data.dedupe(_examples())
    caps = {"train": 200, "validation": 1000, "test": 1000}
    kw = dict(seed=7, validation_fraction=0.1, test_fraction=0.2, caps=caps)
    a = data.stratified_split(kept, **kw)
    b = data.stratified_split(kept, **kw)
    assert a == b
    assert len(a["train"]) == 200
    assert Counter(r["label"] for r in a["validation"]) == {"a": 30, "b": 10}
    assert Counter(r["label"] for r in a["test"]) == {"a": 60, "b": 20}
    train_ratio = Counter(r["label"] for r in a["train"])
    assert train_ratio["a"] == pytest.approx(3 * train_ratio["b"], rel=0.05)
    sets = [{r["text"] for r in a[s]} for s in data.SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    c = data.stratified_split(kept, **{**kw, "seed": 8})
    assert c["test"] != a["test"]


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok", "label": "a"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        data.read_jsonl(p)
    with pytest.raises(DataError, match="file not found"):
        data.read_jsonl(tmp_path / "missing.jsonl")


def test_atomic_dir_leaves_previous_on_failure(tmp_path):
    target = tmp_path / "out"
    with io.atomic_dir(target) as d:
        io.write_text(d / "a.txt", "first")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target) as d:
            io.write_text(d / "a.txt", "second")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigterm_during_a_cli_run_leaves_no_partial_output(tmp_path):
    """`kill` (SIGTERM) of a `cpet` process unwinds like Ctrl-C: the temporary folder goes."""
    import signal
    import subprocess
    import sys

    script = (
        "import time\n"
        "from cpet import io\n"
        "from cpet.cli import raise_on_sigterm\n"
        "raise_on_sigterm()\n"
        f"with io.atomic_dir({str(tmp_path / 'out')!r}) as tmp:\n"
        "    (tmp / 'half.bin').write_bytes(b'x')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.iterdir())) == 1  # the temporary folder, mid-write
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    assert "KeyboardInterrupt: signal 15" in proc.stderr.read()
    assert list(tmp_path.iterdir()) == []
