"""lrc-sft: the SFT loss trains, the CLI trains / checkpoints / resumes exactly / saves a loadable
model on a tiny model, and bad inputs are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lrc.cli.common import CONF_DIR, ConfigError
from lrc.cli.sft import run
from lrc.data.chat import IGNORE


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A plain tiny Llama with the tiny ChatML tokenizer, saved like any transformers model."""
    from lrc.teachers import tiny_teacher, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    tiny_teacher("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_cfg(model: Path, chats: Path, out: Path, *extra: str):
    overrides = [
        f"model.source={model}", f"paths.output_dir={out}", "data=chat_local_jsonl",
        f"data.sources=[{{name:toy,kind:jsonl,path:'{chats}'}}]", "data.seq_len=96", "data.batch_size=2",
        "data.val_fraction=0.1", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
        "callbacks.checkpoint.every_n_train_steps=2", "logger=csv", "summary.max_new_tokens=2", "optim.lr=1e-3",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("sft", overrides=overrides)


def test_sft_loss_falls_on_a_fixed_batch(tiny_model_dir):
    from lrc.data.chat import pack_conversations, render_with_labels
    from lrc.training.sft import SFTModule, load_causal_lm

    model, tok = load_causal_lm(str(tiny_model_dir))
    module = SFTModule(model=str(tiny_model_dir), model_obj=model, tokenizer=tok)
    module.configure_model()
    convs = [render_with_labels([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": f"Hello {i}."}],
                                tok) for i in range(4)]
    rows = pack_conversations(convs, 64, tok.pad_token_id)
    batch = {k: torch.from_numpy(getattr(rows, k)) for k in ("input_ids", "labels", "attention_mask", "segment_ids")}
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, n = module._loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert int(n) == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    assert losses[-1] < 0.5 * losses[0]


def test_sft_loss_is_ce_on_assistant_tokens_only(tiny_model_dir):
    """The loss equals a hand computation: CE over the labelled next tokens, each packed conversation
    run on its own (the document mask keeps packed conversations apart)."""
    from lrc.data.chat import pack_conversations, render_with_labels
    from lrc.training.sft import SFTModule, load_causal_lm

    model, tok = load_causal_lm(str(tiny_model_dir))
    module = SFTModule(model=str(tiny_model_dir), model_obj=model, tokenizer=tok)
    module.configure_model()
    convs = [render_with_labels([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tok)
             for q, a in (("Hi?", "Hello."), ("Name?", "Tiny."))]
    rows = pack_conversations(convs, 96, tok.pad_token_id)
    assert len(rows) == 1  # both in one row
    batch = {k: torch.from_numpy(getattr(rows, k)) for k in ("input_ids", "labels", "attention_mask", "segment_ids")}
    with torch.no_grad():
        got, _ = module._loss(batch)
        total, count = 0.0, 0
        for ids, labels in convs:
            logits = model(torch.tensor([ids])).logits[0]
            for t in range(len(ids) - 1):
                if labels[t + 1] != IGNORE:
                    total += torch.nn.functional.cross_entropy(logits[t], torch.tensor(labels[t + 1])).item()
                    count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_cli_trains_checkpoints_resumes_exactly_and_saves_a_model(tiny_model_dir, chats, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a constant lr, so that a 4-step run continued to 6 steps follows the 6-step run's schedule
    flat = ("optim.schedule=constant", "optim.warmup_ratio=0")
    full = run(sft_cfg(tiny_model_dir, chats, tmp_path / "full", "trainer.max_steps=6", *flat))
    assert full["status"] == "finished" and full["steps"] == 6 and full["tokens_seen"] > 0
    assert full["val"]["ce"] < full["val_before"]["ce"]
    part = run(sft_cfg(tiny_model_dir, chats, tmp_path / "part", *flat))  # 4 steps, checkpoint at 4
    assert part["steps"] == 4 and (tmp_path / "part" / "checkpoints" / "last.ckpt").is_file()
    resumed = run(sft_cfg(tiny_model_dir, chats, tmp_path / "part", "trainer.max_steps=6", "ckpt_path=last", *flat))
    assert resumed["steps"] == 6 and resumed["tokens_seen"] == full["tokens_seen"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "part" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(base.state_dict()["model.embed_tokens.weight"], a.state_dict()["model.embed_tokens.weight"])
    assert AutoTokenizer.from_pretrained(tmp_path / "full" / "model").chat_template
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["data"]["toy"]["train_conversations"] == 54 and (tmp_path / "full" / "config.yaml").is_file()


def test_bad_inputs_are_refused_before_any_work(tiny_model_dir, chats, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no model directory there"):
        run(sft_cfg(tmp_path / "missing", chats, out))
    plain = tmp_path / "no_template"
    from transformers import AutoTokenizer

    for f in tiny_model_dir.iterdir():
        (plain / f.name).parent.mkdir(exist_ok=True)
        (plain / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(plain)
    tok.chat_template = None
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(plain)
    cfg_path = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="its tokenizer has no chat template"):
        run(sft_cfg(plain, chats, out))
    with pytest.raises(ConfigError, match=r"unknown key optim.lrr \(did you mean optim.lr\?\)"):
        run(sft_cfg(tiny_model_dir, chats, out, "+optim.lrr=0.1"))
    with pytest.raises(ConfigError, match="unknown key model.sourc"):
        run(sft_cfg(tiny_model_dir, chats, out, "+model.sourc=x"))
    with pytest.raises(ConfigError, match="model.dtype must be one of"):
        run(sft_cfg(tiny_model_dir, chats, out, "model.dtype=float64"))
    with pytest.raises(ConfigError, match=r"callbacks\.eval\.every_n_steps must be an integer >= 0, got -1"):
        run(sft_cfg(tiny_model_dir, chats, out, "callbacks.eval.every_n_steps=-1"))
    assert not out.exists()  # nothing was written


def refused_while_locked(out: Path, job) -> str:
    """``job()``'s ConfigError while another process holds ``out``'s run-directory lock (as
    ``pid 4242 on node7``); nothing but the lock may be written."""
    import fcntl

    out.mkdir(parents=True)
    with open(out / ".lrc-distill.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7\n")
        held.flush()
        with pytest.raises(ConfigError) as err:
            job()
    assert sorted(p.name for p in out.iterdir()) == [".lrc-distill.lock"]
    return str(err.value)


def test_a_locked_run_directory_is_refused_naming_lrc_sft(tiny_model_dir, chats, tmp_path):
    out = tmp_path / "run"
    message = refused_while_locked(out, lambda: run(sft_cfg(tiny_model_dir, chats, out)))
    assert message == (f"output directory {out} is in use by another lrc-sft run (pid 4242 on node7); "
                       f"wait for it to end or choose another directory (hydra.run.dir=...)")


def test_sft_optim_file_repeats_the_python_defaults():
    from lrc.training.sft import SFT_OPTIM

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("sft", overrides=["model.source=x"])
    optim = OmegaConf.to_container(cfg.optim)
    assert {k: optim[k] for k in SFT_OPTIM} == SFT_OPTIM
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.max_steps == -1 and cfg.data.seq_len == 256


def test_a_failed_start_is_set_aside_naming_lrc_sft(tiny_model_dir, chats, tmp_path, capsys):
    # what a start that never reached a checkpoint left is moved aside, and the message names the tool
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("left: by a failed start\n")
    run(sft_cfg(tiny_model_dir, chats, out, "trainer.max_steps=1"))
    err = capsys.readouterr().err
    (aside,) = out.glob("failed-start-*")
    assert (aside / "config.yaml").read_text() == "left: by a failed start\n"
    assert f"lrc-sft: {out} holds no checkpoint, only what a failed start left (config.yaml)" in err
    assert "lrc-distill" not in err


def test_a_step_of_micro_batches_is_the_mean_over_all_its_labelled_tokens(tiny_model_dir):
    """Two micro-batches with 3 and about 30 labelled tokens, accumulated into one Lightning step: the
    gradient the optimizer sees is that of the CE averaged over all the step's labelled tokens,
    computed here on an untouched copy of the model, not the mean of the two micro-batch means."""
    import copy

    import lightning as L

    from lrc.data.chat import pack_conversations, render_with_labels
    from lrc.losses import next_token_cross_entropy
    from lrc.training.sft import SFTModule, load_causal_lm

    model, tok = load_causal_lm(str(tiny_model_dir))
    reference = copy.deepcopy(model)

    def batch(answer: str) -> dict[str, torch.Tensor]:
        conv = render_with_labels([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": answer}], tok)
        rows = pack_conversations([conv], 96, tok.pad_token_id)
        return {k: torch.from_numpy(getattr(rows, k)) for k in ("input_ids", "labels", "attention_mask", "segment_ids")}

    batches = [batch("Yes."), batch("The answer to that is long, with many words in it, one after another, to the end.")]
    counts = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches]
    assert counts[1] > 5 * counts[0]

    seen: dict[str, torch.Tensor] = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            def snapshot(optimizer, args, kwargs):
                seen.update({n: p.grad.detach().clone() for n, p in pl_module.lm.named_parameters()})
            # after the step: Lightning runs the last micro-batch inside optimizer.step(closure)
            trainer.optimizers[0].register_step_post_hook(snapshot)

    module = SFTModule(model=str(tiny_model_dir), model_obj=model, tokenizer=tok)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Capture()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert module.tokens_seen == sum(counts)

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        reference.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in reference.named_parameters()}

    def ce(b):  # the micro-batch's mean CE over its labelled tokens, on the untouched copy
        return next_token_cross_entropy(reference(b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    token_mean = grads(sum(ce(b) * n for b, n in zip(batches, counts)) / sum(counts))
    mean_of_means = grads(sum(ce(b) for b in batches) / len(batches))
    assert seen.keys() == token_mean.keys()
    for name, g in token_mean.items():
        torch.testing.assert_close(seen[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the two weightings differ, so the comparison above can tell them apart
    assert any(not torch.allclose(token_mean[n], mean_of_means[n], rtol=1e-2, atol=1e-5) for n in token_mean)
