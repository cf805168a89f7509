"""Training on real text: loss falls, resume is exact, checkpoints generate."""

import json

import numpy as np
import pytest

from model_worker.generate import Generator
from model_worker.train import TrainConfig, Trainer, lr_at

pytestmark = pytest.mark.slow


def _config(tmp_path, corpus, tokenizer, **kw):
    values = dict(preset="tiny", steps=20, batch_size=4, seq_len=48, lr=3e-3, warmup_steps=4, eval_every=10,
                  eval_batches=2, ckpt_every=10, out_dir=str(tmp_path / "run"), data=str(corpus), tokenizer=str(tokenizer))
    values.update(kw)
    return TrainConfig(**values)


def test_resume_continues_the_same_loss_curve(tmp_path, small_corpus, small_tokenizer):
    straight = Trainer(_config(tmp_path / "a", small_corpus, small_tokenizer), progress=False, log=lambda *a: None)
    straight.run()
    first = Trainer(_config(tmp_path / "b", small_corpus, small_tokenizer), progress=False, log=lambda *a: None)
    first.run(stop_after=10)
    assert first.step == 10
    resumed = Trainer(_config(tmp_path / "b", small_corpus, small_tokenizer), progress=False, log=lambda *a: None)
    resumed.load(tmp_path / "b" / "run" / "checkpoint")
    resumed.run()
    a = np.asarray(straight.history["train"])
    b = np.asarray(resumed.history["train"])
    assert a.shape == b.shape == (20, 3)
    np.testing.assert_allclose(b[:, 1], a[:, 1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(resumed.history["val"]), np.asarray(straight.history["val"]), atol=1e-6)
    for layer in straight.model_config.engram.layer_ids:
        np.testing.assert_allclose(resumed.backend.table(layer), straight.backend.table(layer), atol=1e-6)


def test_training_lowers_loss_and_generates(tmp_path, small_corpus, small_tokenizer):
    config = _config(tmp_path, small_corpus, small_tokenizer, steps=60, batch_size=8, eval_every=30, ckpt_every=60)
    trainer = Trainer(config, progress=False, log=lambda *a: None)
    before = {l: trainer.backend.table(l).copy() for l in trainer.model_config.engram.layer_ids}
    summary = trainer.run()
    assert summary["val_loss"] < summary["val_loss_start"] - 1.0
    assert 0 < summary["unique_id_ratio"] < 1
    for layer, rows in before.items():
        moved = np.any(trainer.backend.table(layer) != rows, axis=1).sum()
        assert 0 < moved < rows.shape[0]  # only rows seen in training moved
    out = tmp_path / "run"
    assert (out / "loss_curve.png").stat().st_size > 5000
    assert json.loads((out / "summary.json").read_text())["step"] == 60
    generator = Generator.from_checkpoint(out / "checkpoint")
    text = generator.generate("def ", max_new_tokens=30, seed=1)
    assert text.startswith("def ") and len(text) > 10
    # the checkpoint's tables are what the trainer had
    layer = trainer.model_config.engram.layer_ids[0]
    np.testing.assert_array_equal(generator.fetcher.backend.table(layer), trainer.backend.table(layer))


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(100, config) == pytest.approx(0.1)
    assert lr_at(55, config) == pytest.approx(0.55)


def test_resume_refuses_another_model(tmp_path, small_corpus, small_tokenizer):
    trainer = Trainer(_config(tmp_path, small_corpus, small_tokenizer, steps=2, ckpt_every=2), progress=False, log=lambda *a: None)
    trainer.run()
    other = Trainer(_config(tmp_path / "x", small_corpus, small_tokenizer, preset="small", seq_len=48), progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="another model config"):
        other.load(tmp_path / "run" / "checkpoint")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        other.load(tmp_path / "nothing")


def test_builtin_corpus_beats_unigram_baseline(tmp_path):
    """`engram train --preset tiny` on the built-in corpus (the Python standard library)."""
    config = TrainConfig(preset="tiny", steps=150, eval_every=150, ckpt_every=150, out_dir=str(tmp_path / "run"))
    summary = Trainer(config, progress=False, log=lambda *a: None).run()
    assert summary["val_loss"] < summary["unigram_loss"] - 0.5, summary


def _load_in_process(args):
    corpus, tokenizer, cache = args
    import os

    os.environ["ENGRAM_CACHE_DIR"] = cache
    from model_worker.data import load_corpus

    loaded = load_corpus(corpus, tokenizer, log=lambda *a: None)
    return int(loaded.train_ids.size), int(loaded.val_ids.size)


def test_workers_tokenizing_one_corpus_at_once_share_the_cache(tmp_path, small_corpus, small_tokenizer):
    """Model workers on one machine tokenize the same corpus at the same moment: each gets it, the cache ends whole."""
    import multiprocessing

    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        sizes = pool.map(_load_in_process, [(str(small_corpus), str(small_tokenizer), cache)] * 4)
    assert len(set(sizes)) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if "tmp" in p.name] == []  # no temporary file left over
    assert _load_in_process((str(small_corpus), str(small_tokenizer), cache)) == sizes[0]  # read back from the cache
