"""The Hydra ``data`` presets, composed and instantiated against local files of the same schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datatest_utils import IM_START, collect, make_tree, write_jsonl, write_parquet
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lrc.data.corpus import build_embedded_corpus, read_jsonl
from lrc.data.datamodule import TokenMixDataModule
from lrc.data.sources import SourceConfig, override_sources

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = ("embedded", "mixed_1_1", "mixed_2_0", "local_jsonl")
SMALL = dict(seq_len=32, batch_size=4, num_workers=0, pin_memory=False, val_tokens=128, val_sequences=None)


def compose_data(preset: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name=None, overrides=[f"+data={preset}"]).data


def instantiate_local(cfg, overrides: dict, tok, cache: Path, **extra) -> TokenMixDataModule:
    """Instantiate a preset with its sources pointed at local files (kind/path rewritten)."""
    sources = override_sources(OmegaConf.to_container(cfg.sources, resolve=True), overrides)
    dm = instantiate(cfg, sources=sources, cache_dir=str(cache), **{**SMALL, **extra})
    dm.set_tokenizer(tok)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------- local stand-ins


def fineweb_rows(n: int) -> list[dict]:
    """SmolLM-corpus fineweb-edu-dedup schema: text, id, nested metadata with int_score."""
    rows = []
    for i in range(n):
        score = 2 + i % 4  # 2, 3, 4, 5
        body = "LOWQ " if score < 4 else ""
        rows.append({
            "text": f"{body}Fineweb doc {i}: water boils at one hundred degrees at sea level. " * 2,
            "id": f"<urn:{i}>",
            "metadata": {"dump": "CC-MAIN", "url": f"http://x/{i}", "language": "en", "language_score": 0.9,
                         "token_count": 40, "score": score + 0.1, "int_score": score},
        })
    return rows


def openhermes_rows(n: int) -> list[dict]:
    """OpenHermes-2.5 schema: ShareGPT conversations of {from, value, weight}."""
    return [{
        "conversations": [
            {"from": "system", "value": "You are a helpful assistant.", "weight": None},
            {"from": "human", "value": f"What is {i} plus {i}?", "weight": 0.0},
            {"from": "gpt", "value": f"{i} plus {i} is {2 * i}.", "weight": 1.0},
        ],
        "source": "synthetic", "category": "math", "skip_prompt_formatting": False,
    } for i in range(n)]


def dclm_rows(n: int) -> list[dict]:
    return [{"text": f"DCLM page {i}. The market opens at nine and closes at five every day.",
             "url": f"http://d/{i}", "language_id_whole_page_fasttext": {"en": 0.98}} for i in range(n)]


def cosmopedia_rows(n: int) -> list[dict]:
    return [{"prompt": "Write a textbook unit.", "text": f"Unit {i}: fractions describe parts of a whole.",
             "token_length": 12, "audience": "students", "format": "textbook", "seed_data": "web"}
            for i in range(n)]


@pytest.fixture
def files(tmp_path):
    return {
        "fineweb": write_parquet(tmp_path / "fineweb" / "train-0.parquet", fineweb_rows(400)),
        "openhermes": write_jsonl(tmp_path / "openhermes.jsonl", openhermes_rows(30)),
        "dclm": write_jsonl(tmp_path / "dclm.jsonl", dclm_rows(150)),
        "cosmopedia": write_parquet(tmp_path / "cosmopedia.parquet", cosmopedia_rows(120)),
    }


def _prefix_deviation(ids: list[int], weights: list[float]) -> float:
    ids_arr = np.array(ids)
    t = np.arange(1, len(ids) + 1)
    w = np.array(weights) / sum(weights)
    return max(np.abs(np.cumsum(ids_arr == i) - t * w[i]).max() for i in range(len(weights)))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_with_documented_keys(preset):
    cfg = compose_data(preset)
    assert cfg._target_ == "lrc.data.datamodule.TokenMixDataModule"
    for key in ("seq_len", "batch_size", "seed", "sources", "tokenizer"):
        assert key in cfg
    for s in cfg.sources:  # every source is a valid SourceConfig
        SourceConfig.from_any(s)
    # every key of the preset file carries a comment
    for line in (CONF / "data" / f"{preset}.yaml").read_text().splitlines():
        if line and not line.startswith("#") and ":" in line and not line.lstrip().startswith("-"):
            assert "#" in line or line.strip().endswith(":") or line.startswith("  "), line


@pytest.mark.parametrize("preset", PRESETS)
def test_seed_and_document_mask_follow_the_main_config(preset):
    cfg = compose_data(preset)
    assert cfg.seed == 0 and cfg.document_mask is False  # standalone defaults
    root = OmegaConf.create({"seed": 11, "document_mask": True, "data": OmegaConf.to_container(cfg)})
    assert root.data.seed == 11 and root.data.document_mask is True


def test_hub_presets_match_the_paper():
    m11 = {s.name: s for s in compose_data("mixed_1_1").sources}
    assert m11["fineweb_edu"].path == "HuggingFaceTB/smollm-corpus"
    assert m11["fineweb_edu"].config_name == "fineweb-edu-dedup"
    assert m11["fineweb_edu"].filters == {"metadata.int_score": {"min": 4}}
    assert m11["openhermes"].path == "teknium/OpenHermes-2.5"
    assert m11["openhermes"].message_keys == {"role": "from", "content": "value"}
    assert (m11["fineweb_edu"].weight, m11["openhermes"].weight) == (10.0, 0.45)
    assert all(s.kind == "hub" and s.streaming for s in m11.values())
    m20 = {s.name: s.weight for s in compose_data("mixed_2_0").sources}
    assert m20 == {"fineweb_edu": 18.0, "dclm": 2.0, "cosmopedia_v2": 1.0, "openhermes": 0.45}


def test_mixed_1_1_on_local_files(tmp_path, tok, files):
    cfg = compose_data("mixed_1_1")
    dm = instantiate_local(cfg, {
        "fineweb_edu": {"kind": "parquet", "path": str(files["fineweb"].parent / "*.parquet")},
        "openhermes": {"kind": "jsonl", "path": str(files["openhermes"])},
    }, tok, tmp_path / "cache")
    assert dm.streaming and dm.source_names == ["fineweb_edu", "openhermes"]
    batches = collect(dm.train_dataloader())
    ids = [s for b in batches for s in b["source_ids"]]
    assert ids.count(1) >= 3 and ids.count(0) > 20 * ids.count(1)
    assert _prefix_deviation(ids, [10.0, 0.45]) <= 1.0 + 1e-9
    rows = [r for b in batches for r in b["input_ids"]]
    text = "".join(tok.decode(r) for r in rows)
    assert "LOWQ" not in text and "Fineweb doc" in text  # int_score >= 4 only
    hermes = "".join(tok.decode(r) for r, s in zip(rows, ids) if s == 1)
    assert "<|im_start|>user\nWhat is" in hermes and "<|im_start|>assistant\n" in hermes  # roles mapped
    assert any(IM_START in r for r, s in zip(rows, ids) if s == 1)
    val = collect(dm.val_dataloader())
    assert {s for b in val for s in b["source_ids"]} == {0, 1}


def test_mixed_2_0_on_local_files(tmp_path, tok, files):
    cfg = compose_data("mixed_2_0")
    dm = instantiate_local(cfg, {
        "fineweb_edu": {"kind": "parquet", "path": str(files["fineweb"])},
        "dclm": {"kind": "jsonl", "path": str(files["dclm"])},
        "cosmopedia_v2": {"kind": "parquet", "path": str(files["cosmopedia"])},
        "openhermes": {"kind": "jsonl", "path": str(files["openhermes"])},
    }, tok, tmp_path / "cache", seq_len=16)
    ids = [s for b in collect(dm.train_dataloader()) for s in b["source_ids"]]
    assert set(ids) == {0, 1, 2, 3}
    assert _prefix_deviation(ids, [18.0, 2.0, 1.0, 0.45]) <= 1.0 + 1e-9


def test_local_jsonl_preset(tmp_path, tok):
    text = write_jsonl(tmp_path / "corpus" / "part1.jsonl",
                       [{"text": f"Plain document {i} about rivers and hills."} for i in range(120)])
    chats = write_jsonl(tmp_path / "chats.jsonl",
                        [{"messages": [{"role": "user", "content": f"hi {i}"},
                                       {"role": "assistant", "content": "hello there"}]} for i in range(60)])
    cfg = compose_data("local_jsonl")
    dm = instantiate_local(cfg, {"my_text": {"path": str(text.parent / "*.jsonl")},
                                 "my_chats": {"path": str(chats)}}, tok, tmp_path / "cache", val_tokens=None)
    tps = dm.tokens_per_source
    assert tps["my_text"] > 0 and abs(tps["my_text"] / 32 - 3 * tps["my_chats"] / 32) <= 3
    # as shipped, the example paths do not exist: a clear error at construction
    with pytest.raises(InstantiationException, match=r"'my_text' \(jsonl\): no file matches"):
        instantiate(cfg)


def test_embedded_preset_on_a_small_tree(tmp_path, tok):
    tree = make_tree(tmp_path / "site")
    cfg = compose_data("embedded")
    dm = instantiate_local(cfg, {"embedded": {"path": [str(tree)]}}, tok, tmp_path / "cache",
                           seq_len=16, val_tokens=None)
    corpus = build_embedded_corpus(tmp_path / "cache", roots=[tree])
    train_docs = [r["text"] for r in read_jsonl(corpus.train)]
    val_docs = [r["text"] for r in read_jsonl(corpus.validation)]
    assert train_docs and val_docs
    # training tokens = the train split packed; validation = the held-out packages
    train_bytes = sum(len(t.encode()) + 1 for t in train_docs)
    assert dm.tokens_per_source["embedded"] == train_bytes // 16 * 16
    val_bytes = sum(len(t.encode()) + 1 for t in val_docs)
    assert dm.val_tokens_per_source["embedded"] == val_bytes // 16 * 16
    val_text = "".join(tok.decode(r) for b in collect(dm.val_dataloader()) for r in b["input_ids"])
    assert val_docs[0][:40] in val_text
    assert all(t[:40] not in val_text for t in train_docs)
