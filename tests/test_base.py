"""charnn train --base: a new run starts from a base model (auto, none, a
shipped base's name, any checkpoint), says which and why, records it, and
resumes exactly; bad bases are clear errors or explained fallbacks."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import signal

import pytest
import torch

from charnn.storage import checkpoint
from charnn.training import base as base_mod
from charnn.training.config import TrainConfig
from charnn.training.setup import start_from

from conftest import assert_clean_error, invoke, make_text
from test_resume import assert_same_bits, printed_resume, stop_at

RUN = ["--batch-size", "4", "--seq-len", "16", "--precision", "fp32", "--eval-every", "5", "--sample-every", "0"]
CHINESE = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 40


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "letters.txt"
    path.write_text(make_text(8000, seed=11), encoding="utf-8")
    return path


def joined(result) -> str:
    return " ".join(result.stderr.split())


def test_a_checkpoint_as_base_is_fine_tuned_named_at_start_and_recorded(trained, english, tmp_path):
    r = invoke("train", english, "--base", trained.best, "--max-steps", "6", "-o", tmp_path / "run", *RUN)
    assert r.exit_code == 0, r.output
    text = joined(r)
    assert "start: fine-tuning" in text and "--base" in text and "of the text's characters" in text
    saved = checkpoint.load(tmp_path / "run" / "best.pt")
    assert saved.model_config.hidden_size == checkpoint.load(trained.best).model_config.hidden_size
    assert saved.train_config["base"] != "none" and "fine-tuning" in saved.train_config["base_reason"]
    info = invoke("info", tmp_path / "run" / "best.pt")
    assert "fine-tuning" in " ".join(info.output.split())


def test_the_start_line_says_100_percent_only_when_the_base_knows_every_character(trained, english, tmp_path):
    corpus = tmp_path / "tab.txt"
    corpus.write_text(english.read_text(encoding="utf-8") + "\t", encoding="utf-8")  # one character it lacks
    r = invoke("train", corpus, "--base", trained.best, "--max-steps", "1", "-o", tmp_path / "run", *RUN)
    assert r.exit_code == 0, r.output
    text = joined(r)
    assert "vocabulary extended by 1 character" in text and "it knows 99.9% of the text's characters" in text, text
    r = invoke("train", english, "--base", trained.best, "--max-steps", "1", "-o", tmp_path / "all", *RUN)
    assert "it knows 100.0% of the text's characters" in joined(r)


def test_base_none_trains_from_scratch(trained, english, tmp_path):
    r = invoke("train", english, "--base", "none", "--max-steps", "3", "-o", tmp_path / "run", *RUN,
               "--hidden-size", "24", "--num-layers", "1", "--embedding-dim", "8")
    assert r.exit_code == 0, r.output
    saved = checkpoint.load(tmp_path / "run" / "best.pt")
    assert saved.model_config.hidden_size == 24 and saved.train_config["base"] == "none"
    assert "start: from scratch: --base none" in joined(r)  # every start line says which start it is


def test_a_run_started_from_a_base_resumes_exactly(trained, english, tmp_path, monkeypatch):
    args = ["train", english, "--base", trained.best, "--max-steps", "12", "--log-every", "1", *RUN]
    assert invoke(*args, "-o", tmp_path / "straight").exit_code == 0
    with monkeypatch.context() as m:
        stop_at(m, 6, signal.SIGINT)
        stopped = invoke(*args, "-o", tmp_path / "stopped")
    assert stopped.exit_code == 130, stopped.output
    resumed = invoke(*printed_resume(stopped.stderr))
    assert resumed.exit_code == 0, resumed.output
    assert_same_bits(tmp_path / "straight" / "last.pt", tmp_path / "stopped" / "last.pt")


@pytest.fixture
def shipped(trained, tmp_path, monkeypatch):
    """A base installed as charnn ships one: a checkpoint and its card with the
    character pairs of its training text (the trained fixture's own text)."""
    folder = tmp_path / "bases"
    folder.mkdir()
    shutil.copy(trained.best, folder / f"{base_mod.DEFAULT_BASE}.pt")
    text = trained.text
    card = {"name": base_mod.DEFAULT_BASE, "bigrams": sorted({text[i:i + 2] for i in range(len(text) - 1)})}
    (folder / f"{base_mod.DEFAULT_BASE}.json").write_text(json.dumps(card), encoding="utf-8")
    monkeypatch.setattr(base_mod, "BASES_DIR", folder)
    return folder


def load(path):
    return checkpoint.load(path)


def test_auto_fine_tunes_a_base_that_knows_the_text_and_not_one_that_does_not(shipped, trained):
    known = base_mod.choose_base("auto", trained.text[:3000], load)
    assert known.path == shipped / f"{base_mod.DEFAULT_BASE}.pt" and known.reason.startswith("fine-tuning")
    other = base_mod.choose_base("auto", CHINESE, load)
    assert other.path is None and "does not know this text well enough" in other.reason
    assert base_mod.choose_base("none", trained.text, load).path is None


def test_auto_trains_from_scratch_when_the_user_chose_the_shape(shipped, trained):
    cfg = TrainConfig(base="auto").validate()
    choice = start_from(cfg, trained.text, {"hidden_size": 64})
    assert choice.path is None and "--hidden-size chooses the shape" in choice.reason
    assert start_from(TrainConfig(base="auto", size="fixed").validate(), trained.text, {}).path is None
    assert start_from(cfg, trained.text, {"dropout": 0.3}).path is not None  # dropout is not a shape


def test_auto_without_an_installed_base_trains_from_scratch(tmp_path, monkeypatch, trained):
    monkeypatch.setattr(base_mod, "BASES_DIR", tmp_path / "nothing")
    choice = base_mod.choose_base("auto", trained.text, load)
    assert choice.path is None and choice.reason == "from scratch: no base model is installed"


def test_an_unknown_base_is_a_clear_error(english, tmp_path):
    r = invoke("train", english, "--base", "klingon-poetry", "--max-steps", "2", "-o", tmp_path / "run", *RUN)
    assert_clean_error(r, "--base klingon-poetry", "no such base or file", "none")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_base_with_resume_or_init_from_is_refused(trained, english, tmp_path):
    r = invoke("train", "--resume", trained.last, "--base", "none")
    assert_clean_error(r, "--base starts a new run", "a resumed run keeps its start")
    assert "drop --base" in joined(r)
    r = invoke("train", english, "--init-from", trained.best, "--base", trained.best, "-o", tmp_path / "x")
    assert_clean_error(r, "give --base or --init-from, not both")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"\x80\x02}q\x00."])
def test_a_damaged_or_foreign_base_file_is_a_clear_error(english, tmp_path, content):
    bad = tmp_path / "base.pt"
    bad.write_bytes(content)
    r = invoke("train", english, "--base", bad, "--max-steps", "2", "-o", tmp_path / "run", *RUN)
    assert_clean_error(r, "base.pt")
    assert f"--base {bad}:" in joined(r) and "--base none trains from scratch" in joined(r)
    assert not (tmp_path / "run" / "best.pt").exists()


@pytest.mark.parametrize("flag", ["--base", "--init-from"])
def test_overwrite_never_deletes_the_checkpoint_a_run_starts_from(trained, english, tmp_path, flag):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained.best, run / "best.pt")
    before = (run / "best.pt").read_bytes()
    r = invoke("train", english, flag, run / "best.pt", "--max-steps", "2", "-o", run, "--overwrite", *RUN)
    assert_clean_error(r)
    assert "is in the --out folder that --overwrite empties" in joined(r), joined(r)
    assert (run / "best.pt").read_bytes() == before


def test_a_bad_base_fails_before_overwrite_removes_the_old_run(trained, english, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", english, "--base", trained.best, "--max-steps", "1", "-o", run, *RUN).exit_code == 0
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".jsonl")}
    bad = tmp_path / "base.pt"
    bad.write_bytes(trained.best.read_bytes()[:3000])
    r = invoke("train", english, "--base", bad, "--max-steps", "1", "-o", run, "--overwrite", *RUN)
    assert_clean_error(r)
    assert f"--base {bad}:" in joined(r)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".jsonl")} == kept


def test_a_damaged_shipped_base_says_the_installation_is_damaged_and_how_to_go_on(shipped, english, tmp_path):
    installed = shipped / f"{base_mod.DEFAULT_BASE}.pt"
    installed.write_bytes(installed.read_bytes()[:4000])
    r = invoke("train", english, "--max-steps", "2", "-o", tmp_path / "run", *RUN)  # --base auto, not asked for
    assert_clean_error(r)
    text = joined(r)
    assert f"the base {base_mod.DEFAULT_BASE} shipped with charnn cannot be read" in text, text
    assert "Reinstall charnn, or pass --base none" in text
    assert not (tmp_path / "run" / "best.pt").exists()


def test_an_empty_base_or_a_link_to_nothing_is_a_clear_error(english, tmp_path):
    r = invoke("train", english, "--base", "", "--max-steps", "2", "-o", tmp_path / "run", *RUN)
    assert_clean_error(r, "--base is empty")
    r = invoke("train", english, "--base", "b" * 5000 + ".pt", "--max-steps", "2", "-o", tmp_path / "run", *RUN)
    assert_clean_error(r, "File name too long")
    assert r.stderr.startswith("Error: --base bbbb") and "unexpected" not in r.stderr, r.stderr[:300]
    r = invoke("train", english, "--init-from", "b" * 5000 + ".pt", "--max-steps", "2", "-o", tmp_path / "run", *RUN)
    assert_clean_error(r, "cannot read checkpoint bbbb", "File name too long")
    dangling, loop = tmp_path / "gone.pt", tmp_path / "loop.pt"
    dangling.symlink_to(tmp_path / "missing.pt")
    loop.symlink_to(loop)
    for link in (dangling, loop):
        r = invoke("train", english, "--base", link, "--max-steps", "2", "-o", tmp_path / "run", *RUN)
        assert_clean_error(r)
        assert f"--base {link}: checkpoint {link} is a symlink" in joined(r), joined(r)
    assert not (tmp_path / "run" / "best.pt").exists()


def test_a_base_that_shares_nothing_with_the_text_says_so_and_still_trains(trained, tmp_path):
    corpus = tmp_path / "poem.txt"
    corpus.write_text(CHINESE, encoding="utf-8")
    r = invoke("train", corpus, "--base", trained.best, "--max-steps", "3", "-o", tmp_path / "run", *RUN)
    assert r.exit_code == 0, r.output
    text = joined(r)
    known = re.search(r"it knows ([\d.]+)% of the text's characters", text)
    assert known and float(known.group(1)) < 10, text  # the newlines only
    assert "--base none trains from scratch" in text
    assert "vocabulary extended" in text
    assert "'床' (U+5E8A)" in text  # which characters: the user can tell a typo from a new script
    # The recipe belongs to the fine-tuning, so it comes before the advice to train from scratch.
    assert re.search(r"\([^()]*lr [^()]*\); it gains little on a text it does not know", text), text
    saved = checkpoint.load(tmp_path / "run" / "best.pt")
    assert set(CHINESE) <= set(saved.tokenizer.chars)
    assert all(bool(torch.isfinite(t).all()) for t in saved.data["model_state"].values())


def test_a_shape_option_that_differs_from_the_base_is_a_clear_error(trained, english, tmp_path):
    r = invoke("train", english, "--base", trained.best, "--hidden-size", "999", "--max-steps", "2", "-o", tmp_path / "run", *RUN)
    assert_clean_error(r, "cannot start from the base", "--hidden-size 999", "--base none")


def test_a_shipped_base_is_named_not_shown_as_a_path_inside_the_package(shipped, english, tmp_path):
    r = invoke("train", english, "--base", base_mod.DEFAULT_BASE, "--hidden-size", "999", "--max-steps", "2",
               "-o", tmp_path / "run", *RUN)
    assert_clean_error(r, "--hidden-size 999")
    assert f"cannot start from the base {base_mod.DEFAULT_BASE}:" in joined(r), joined(r)


def test_a_run_from_a_base_takes_the_fine_tuning_recipe_for_what_was_left_open(trained, english, tmp_path):
    r = invoke("train", english, "--base", trained.best, "--max-steps", "2", "--precision", "fp32",
               "--eval-every", "2", "--sample-every", "0", "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    saved = checkpoint.load(tmp_path / "run" / "best.pt")
    recipe = {k: saved.train_config[k] for k in base_mod.FINE_TUNE}
    assert recipe == base_mod.FINE_TUNE
    assert saved.model_config.dropout == base_mod.FINE_TUNE_DROPOUT
    assert f"lr {base_mod.FINE_TUNE['lr']:g}" in joined(r) and f"dropout {base_mod.FINE_TUNE_DROPOUT:g}" in joined(r)
    # What the user gave stands, even where it equals the from-scratch default.
    default_lr = TrainConfig().lr
    r = invoke("train", english, "--base", trained.best, "--max-steps", "2", *RUN, "--lr", str(default_lr),
               "--dropout", "0", "-o", tmp_path / "given")
    assert r.exit_code == 0, r.output
    saved = checkpoint.load(tmp_path / "given" / "best.pt")
    assert (saved.train_config["batch_size"], saved.train_config["seq_len"], saved.train_config["lr"]) == (4, 16, default_lr)
    assert saved.model_config.dropout == 0
    assert "lr " not in joined(r).split("start:")[1].split("\n")[0]
    # From scratch, the from-scratch defaults hold.
    r = invoke("train", english, "--base", "none", "--max-steps", "2", "--precision", "fp32", "--sample-every", "0",
               "--hidden-size", "16", "--num-layers", "1", "-o", tmp_path / "scratch")
    assert r.exit_code == 0, r.output
    saved = checkpoint.load(tmp_path / "scratch" / "best.pt")
    assert (saved.train_config["batch_size"], saved.train_config["lr"]) == (TrainConfig().batch_size, default_lr)


def test_fine_tuning_plans_the_epochs_a_small_text_takes_and_says_when_they_end_the_run(trained, english, tmp_path):
    r = invoke("train", english, "--base", trained.best, "--time-limit", "10m", "--precision", "fp32",
               "--sample-every", "0", "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    train_chars = round(len(english.read_text(encoding="utf-8")) * (1 - TrainConfig().val_fraction))
    planned = base_mod.fine_tune_epochs(train_chars)
    assert saved.train_config["epochs"] == planned
    assert [row["epoch"] for row in saved.metrics if "epoch" in row][-1] == pytest.approx(planned)
    text = joined(r)
    assert f"at most {planned:g} epochs" in text.split("start:")[1].split("reading:")[0], text
    assert re.search(rf"Done: [\d,]+ steps \({planned:g} epochs, \d+ seconds of the 10 minutes allowed\)", text), text
    # A budget the user gave in steps or epochs stands: no plan of epochs is added.
    for budget in (["--max-steps", "7"], ["--epochs", "1"]):
        r = invoke("train", english, "--base", trained.best, *budget, *RUN, "-o", tmp_path / budget[0][2:])
        assert r.exit_code == 0, r.output
        assert "epochs" not in joined(r).split("start:")[1].split("reading:")[0]
    assert checkpoint.load(tmp_path / "max-steps" / "last.pt").train_state["step"] == 7
    assert not checkpoint.load(tmp_path / "max-steps" / "last.pt").train_config.get("epochs")


def test_the_epochs_fine_tuning_plans_grow_with_the_text_and_never_fall_below_the_floor():
    sizes = [1_000, 50_000, 270_000, 900_000, 5_000_000]
    epochs = [base_mod.fine_tune_epochs(n) for n in sizes]
    assert epochs == sorted(epochs) and epochs[0] == base_mod.MIN_EPOCHS
    assert base_mod.fine_tune_epochs(base_mod.EPOCHS_AT[0]) == base_mod.EPOCHS_AT[1]


def test_the_start_line_names_the_recipe_s_chunk_length_without_calling_it_an_option(trained, english, tmp_path):
    r = invoke("train", english, "--base", trained.best, "--batch-size", "8", "--max-steps", "1", "--precision",
               "fp32", "--sample-every", "0", "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    start = joined(r).split("start:")[1].split("reading:")[0]
    assert f"{base_mod.FINE_TUNE['seq_len']}-character chunks" in start and "--seq-len" not in start, start


def test_a_dict_of_options_with_a_misspelled_key_is_a_clear_error(english, tmp_path):
    from charnn.errors import ConfigError
    from charnn.training.trainer import train

    with pytest.raises(ConfigError, match="unknown training option.*bse.*model_overrides"):
        train({"corpus": [str(english)], "max_steps": 1, "out": str(tmp_path / "run"), "bse": "none"})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("base", ["auto", "klingon-poetry"])
def test_the_python_api_refuses_a_base_with_init_from_rather_than_record_a_start_it_did_not_take(
        trained, english, tmp_path, base):
    from charnn.errors import ConfigError
    from charnn.training.trainer import train

    with pytest.raises(ConfigError, match="exclude each other"):
        train({"corpus": [str(english)], "max_steps": 1, "out": str(tmp_path / "run"), "base": base},
              init_from=trained.best)
    assert not (tmp_path / "run").exists()


def test_a_json_file_beside_a_checkpoint_is_no_card_and_a_damaged_card_is_ignored(shipped, trained, english, tmp_path):
    mine = tmp_path / "mine.pt"
    shutil.copy(trained.best, mine)
    mine.with_suffix(".json").write_text('{"bigrams": [[1, 2], {"a": 1}], "characters": true}', encoding="utf-8")
    r = invoke("train", english, "--base", mine, "--max-steps", "1", "-o", tmp_path / "run", *RUN)
    assert r.exit_code == 0, r.output
    assert "character pairs" not in joined(r)  # only charnn's own bases have cards
    for junk in ("[1, 2]", '{"bigrams": [[1, 2]], "characters": "many"}'):
        (shipped / f"{base_mod.DEFAULT_BASE}.json").write_text(junk, encoding="utf-8")
        assert base_mod.choose_base("auto", trained.text[:3000], load).path is not None


def test_auto_trains_from_scratch_on_a_text_larger_than_the_bases_own(shipped, trained):
    card_path = shipped / f"{base_mod.DEFAULT_BASE}.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["characters"] = 2000
    card_path.write_text(json.dumps(card), encoding="utf-8")
    assert base_mod.choose_base("auto", trained.text[:2000], load).path is not None
    larger = base_mod.choose_base("auto", trained.text[:2001], load)
    assert larger.path is None and "larger than" in larger.reason and "2,001" in larger.reason
    assert base_mod.choose_base(base_mod.DEFAULT_BASE, trained.text[:2001], load).path is not None  # named: taken
    # The card alone decides for a larger text: the base is not read (a large text's coverage takes seconds).
    installed = shipped / f"{base_mod.DEFAULT_BASE}.pt"
    installed.write_bytes(installed.read_bytes()[:4000])
    assert "larger than" in base_mod.choose_base("auto", trained.text[:2001], load).reason


# -- the base charnn ships ---------------------------------------------------------

SHIPPED = base_mod.shipped_bases()
needs_shipped = pytest.mark.skipif(base_mod.DEFAULT_BASE not in SHIPPED, reason="no shipped base in this checkout")
LETTER = ("My dear Margaret, the weather has turned at last, and the road from the village is deep in mud. "
          "I walked to the mill this morning and found the old miller asleep beside his fire; he woke, and "
          "we talked for an hour about the harvest, his daughter's wedding, and the price of bread in town.\n")


@needs_shipped
def test_the_shipped_base_is_a_bf16_checkpoint_with_a_card_that_names_its_sources():
    path = SHIPPED[base_mod.DEFAULT_BASE]
    saved = checkpoint.load(path)
    assert all(t.dtype == torch.bfloat16 for t in saved.data["model_state"].values())
    card = base_mod.card(path)
    recorded = dict(reversed(line.split(None, 1)) for line in
                    (base_mod.BASES_DIR.parent.parent / "benchmarks" / "results" / "bases-sources.sha256")
                    .read_text().splitlines())
    assert {s["file"]: s["sha256"] for s in card["sources"]} == recorded
    assert all("public domain" in s["licence"] for s in card["sources"])
    assert card["corpus_sha256"] == saved.train_config["corpus_hash"] and card["characters"] > 10_000_000
    assert len(card["bigrams"]) > 1000 and all(len(p) == 2 for p in card["bigrams"])


@needs_shipped
def test_the_shipped_base_knows_english_it_never_read_and_auto_starts_from_it(tmp_path):
    from charnn.model.scoring import evaluate_ids

    model, tokenizer, _ = checkpoint.load_model(SHIPPED[base_mod.DEFAULT_BASE])
    loss = evaluate_ids(model, torch.as_tensor(tokenizer.encode(LETTER * 3))).loss
    assert loss < 1.9, loss  # an untrained model: ln(116) = 4.75; a unigram model about 3
    corpus = tmp_path / "letters.txt"
    corpus.write_text(LETTER * 40, encoding="utf-8")
    r = invoke("train", corpus, "--max-steps", "1", "--eval-every", "1", "--sample-every", "0", "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert f"start: fine-tuning {base_mod.DEFAULT_BASE}: it knows 100.0% of the text's characters" in joined(r)
    saved = checkpoint.load(tmp_path / "run" / "best.pt")
    assert saved.train_config["base"] == base_mod.DEFAULT_BASE
    assert saved.model_config.hidden_size == model.config.hidden_size


@needs_shipped
def test_auto_trains_chinese_from_scratch_and_says_why(tmp_path):
    corpus = tmp_path / "poems.txt"
    corpus.write_text(CHINESE * 5, encoding="utf-8")
    r = invoke("train", corpus, "--max-steps", "2", "--sample-every", "0", "-o", tmp_path / "run",
               "--hidden-size", "32", "--size", "auto")
    assert r.exit_code == 0, r.output
    assert "from scratch: --hidden-size chooses the shape" in joined(r)
    r = invoke("train", corpus, "--max-steps", "2", "--sample-every", "0", "-o", tmp_path / "auto", "--overwrite")
    assert r.exit_code == 0, r.output
    assert f"from scratch: {base_mod.DEFAULT_BASE} does not know this text well enough" in joined(r)
    assert checkpoint.load(tmp_path / "auto" / "best.pt").train_config["base"] == "none"


def test_the_commands_that_read_a_checkpoint_take_a_bases_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("sample", "prose-en", "-n", "60", "--seed", "1", "--no-copy-report")
    assert r.exit_code == 0, r.output
    assert len(r.stdout) >= 60
    r = invoke("info", "prose-en", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["path"] == str(base_mod.shipped_bases()["prose-en"])
    r = invoke("eval", "prose-en", "--help")
    assert "shipped base's name" in r.stdout
    # A file of that name in the current folder is what the user means.
    (tmp_path / "prose-en").write_bytes(b"")
    assert_clean_error(invoke("info", "prose-en"), "prose-en is empty")
    assert_clean_error(invoke("sample", "prose-nope"), "prose-nope does not exist")


@needs_shipped
def test_auto_tells_english_from_text_in_the_same_letters_that_is_not():
    """The base's surprise at a text, before any training, decides: English
    it never read passes; the same letters reversed word by word, and Python
    source (the built-in corpus's kind of text), do not."""
    english = base_mod.choose_base("auto", LETTER * 20, load)
    assert english.path is not None, english.reason
    said = re.search(r"finds it ([\d.]+)x as surprising as its own text", english.reason)
    assert said and float(said.group(1)) <= base_mod.MAX_SURPRISE, english.reason
    reversed_words = "\n".join(" ".join(w[::-1] for w in line.split()) for line in (LETTER * 20).splitlines())
    assert base_mod.choose_base("auto", reversed_words, load).path is None
    code = inspect.getsource(re) + inspect.getsource(json)
    chosen = base_mod.choose_base("auto", code, load)
    assert chosen.path is None and "does not know this text well enough" in chosen.reason, chosen.reason
