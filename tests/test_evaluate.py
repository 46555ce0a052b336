"""One token NLL: training-time validation and `jaxgen eval perplexity` report the same figures."""

import jax
import pytest

from jaxgen.config import load_config
from jaxgen.data import prepare
from jaxgen.evaluate.perplexity import perplexity_of_split
from jaxgen.inference import LanguageModel
from jaxgen.runtime import activate, make_mesh
from jaxgen.tokenizer import load_tokenizer
from jaxgen.train import TrainStep
from jaxgen.train.loop import resolve_config
from jaxgen.train.reports import evaluate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa\n" * 40).split(" ")
    (root / "text.txt").write_text(" ".join(words[i * 7 % len(words)] for i in range(2000)))
    config = load_config(None, [
        "model.preset=tiny", "model.dtype=float32", "model.max_len=32",
        f"data.train_files=[{root / 'text.txt'}]",
        f"data.data_dir={root / 'prepared'}", "tokenizer.kind=char", "tokenizer.vocab_size=64",
        "train.seq_len=32", "train.batch_size=16", "eval.batch_size=8", "train.loss_chunk=8",
    ])  # fmt: skip
    info = prepare(config, progress=False)
    tokenizer = load_tokenizer(info.tokenizer_path)
    return resolve_config(config, tokenizer), tokenizer


def test_validation_and_eval_perplexity_agree(setup):
    config, tokenizer = setup
    mesh = make_mesh(config.mesh)
    with activate(mesh):
        trainer = TrainStep.from_config(config, mesh)
        params = trainer.init(jax.random.key(3)).params
        during_training = evaluate(trainer, params, config, mesh, None)
    standalone = perplexity_of_split(LanguageModel(config, params, tokenizer, mesh), "validation")
    assert set(during_training) == set(standalone)
    assert during_training["tokens"] == standalone["tokens"] > 0
    for key in ("nats_per_token", "perplexity", "nats_per_char", "bits_per_byte"):
        assert abs(during_training[key] - standalone[key]) <= 1e-5 * max(1.0, abs(standalone[key])), key
