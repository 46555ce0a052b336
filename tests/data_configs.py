"""The data tests' config: char tokenizer, the given source files, a temp data dir."""

from __future__ import annotations

import json

from jaxgen.config import load_config


def char_data_config(tmp_path, files, *overrides):
    return load_config(
        None,
        [
            f"data.train_files={json.dumps([str(f) for f in files])}",
            f"data.data_dir={tmp_path / 'prepared'}",
            "tokenizer.kind=char",
            "tokenizer.vocab_size=256",
            *overrides,
        ],
    )
