"""Chat templates: rendering, the loss on assistant turns only, the sandbox, and chat at inference."""

import json
import pathlib

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxgen import cli
from jaxgen.checkpoint import save_params
from jaxgen.config import load_config
from jaxgen.data import builder, prepare, sources
from jaxgen.data.chat import ChatTemplate, PlainChat
from jaxgen.data.sft import encode_record
from jaxgen.errors import JaxgenError
from jaxgen.inference import LanguageModel
from jaxgen.inference import jsonl as generate_jsonl
from jaxgen.model.transformer import init_params
from jaxgen.tokenizer import HFTokenizer

# Meta-Llama-3-8B-Instruct's template, verbatim (as json.loads gives it).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
# Llama-3-Instruct names its end of turn as the eos; a ChatML base model (Qwen) has <|endoftext|>.
LLAMA3_SETTINGS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3}
CHATML_SETTINGS = {"bos_token": None, "eos_token": "<|endoftext|>", "chat_template": CHATML}
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIALS += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Grüß dich!"},
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "5"},
]


def _hf_dir(path: pathlib.Path, settings: dict | None) -> pathlib.Path:
    """A byte-level tokenizer with no merges (one token per byte, so text tokenizes the same
    however it is cut) plus the templates' special tokens, saved as an HF directory."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    if settings is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return path


def _expected(tok: HFTokenizer, segments: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Tokens and loss mask of hand-written (text, trained) segments."""
    tokens, mask = [], []
    for text, trained in segments:
        ids = tok.encode(text)  # special tokens in the text become their single ids
        tokens += ids
        mask += [trained] * len(ids)
    return tokens, mask


def _encode(tok: HFTokenizer, messages: list[dict]):
    """A chat record as `write_sft` encodes it."""
    template = ChatTemplate.from_directory(tok.directory)
    parts = sources.sft_parts(
        {"messages": messages}, load_config(None, []).data, pathlib.Path("x"), 1, template
    )
    tokens, mask = encode_record(tok, parts, tok.encode_batch([t for t, _ in parts]))
    return tokens.tolist(), mask.tolist()


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def test_llama3_template_trains_assistant_contents_and_eot_only(tmp_path):
    tok = HFTokenizer(_hf_dir(tmp_path, LLAMA3_SETTINGS))
    bos, eot = tok.piece_to_id("<|begin_of_text|>"), tok.piece_to_id("<|eot_id|>")
    assert (tok.bos_id, tok.eos_id) == (bos, eot)
    h = _llama3_header
    want = _expected(
        tok,
        [
            ("<|begin_of_text|>", 0),
            (h("system") + "Be terse.<|eot_id|>" + h("user") + "Hi there<|eot_id|>" + h("assistant"), 0),
            ("Grüß dich!", 1),
            ("<|eot_id|>", 1),
            (h("user") + "2+3?<|eot_id|>" + h("assistant"), 0),
            ("5", 1),
            ("<|eot_id|>", 1),  # the eos too: no second one is appended
        ],
    )
    assert _encode(tok, CONVERSATION) == want
    tokens = want[0]
    assert tokens.count(bos) == 1 and tokens[-2:] != [eot, eot]


def test_chatml_template_trains_assistant_contents_and_im_end_only(tmp_path):
    tok = HFTokenizer(_hf_dir(tmp_path, CHATML_SETTINGS))
    eot = tok.piece_to_id("<|endoftext|>")
    assert tok.bos_id == tok.eos_id == eot  # no bos in the settings: GPT-2's fallback
    want = _expected(
        tok,
        [
            ("<|endoftext|>", 0),
            ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n", 0),
            ("<|im_start|>assistant\n", 0),
            ("Grüß dich!<|im_end|>\n", 1),  # the template's end of turn is "<|im_end|>\n"
            ("<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n", 0),
            ("5<|im_end|>\n", 1),
            ("<|endoftext|>", 1),  # the record's eos, predicted after the last turn
        ],
    )
    assert _encode(tok, CONVERSATION) == want


def test_template_sources_and_their_errors(tmp_path):
    listed = {
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    }
    assert ChatTemplate.from_directory(_hf_dir(tmp_path / "list", listed)).text == CHATML
    assert ChatTemplate.from_directory(_hf_dir(tmp_path / "none", {"eos_token": "<|endoftext|>"})) is None
    bad = tmp_path / "bad"
    for settings, message in [
        ("{oops", r"bad/tokenizer_config.json: cannot read tokenizer settings"),
        (json.dumps({"chat_template": 5}), r"tokenizer_config.json: chat_template is int, not a string"),
        (json.dumps({"chat_template": [{"name": "x", "template": "y"}]}), r"none named 'default'"),
        (json.dumps({"chat_template": "{% for %}"}), r"tokenizer_config.json: chat template line 1: "),
    ]:
        _hf_dir(bad, None)
        (bad / "tokenizer_config.json").write_text(settings, encoding="utf-8")
        with pytest.raises(JaxgenError, match=message):
            ChatTemplate.from_directory(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{ ''.__class__.__mro__ }}", r"t.jinja: chat template refused by the sandbox: access to attribute"),
        ("{{ messages.append(1) }}", r"t.jinja: chat template refused by the sandbox"),
        (
            "{{ raise_exception('Only user and assistant roles') }}",
            r"t.jinja: chat template raised: Only user",
        ),
    ],
)
def test_the_sandbox_and_raise_exception_are_one_line_errors(text, message):
    with pytest.raises(JaxgenError, match=message):
        ChatTemplate(text, "t.jinja").render([{"role": "user", "content": "hi"}])


def test_what_transformers_gives_templates():
    messages = [{"role": "user", "content": "Grüß <b>"}]
    tojson = ChatTemplate("{{ messages | tojson }}").render(messages)
    assert tojson == '[{"role": "user", "content": "Grüß <b>"}]'  # not HTML-escaped, not ASCII-escaped
    marked = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert ChatTemplate(marked).render(messages) == "Grüß <b>"
    assert ChatTemplate("{{ bos_token }}{{ day }}", bos_token="<s>").render(messages, day="Mon") == "<s>Mon"


def test_a_template_that_rewrites_earlier_turns_cannot_be_split():
    marks_last = (
        "{% for m in messages %}{% if loop.last %}>{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    with pytest.raises(JaxgenError, match=r"t.jinja: chat template is not prefix-consistent"):
        ChatTemplate(marks_last, "t.jinja").parts(CONVERSATION)


def test_plain_format_and_generation_prompts():
    plain = PlainChat("<{role}> ", "\n", reply_role="bot")
    messages = [{"role": "user", "content": "hi"}]
    assert plain.render(messages, add_generation_prompt=True) == "<user> hi\n<bot> "
    template = ChatTemplate(CHATML)
    assert template.render(messages, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.parts(messages, add_generation_prompt=True) == [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False)
    ]


def test_prepare_renders_chat_records_with_the_tokenizers_template(tmp_path):
    tok_dir = _hf_dir(tmp_path / "tok", CHATML_SETTINGS)
    records = [{"messages": CONVERSATION}, {"prompt": "Q: 1+1? A:", "response": " 2"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    info = prepare(_sft_config(tmp_path, path, tok_dir), progress=False)
    tok = HFTokenizer(tok_dir)
    source = builder.open_split(info.dataset_dir, "train")
    chat_record, plain_record = source[0], source[1]
    trained = chat_record["tokens"][chat_record["loss_mask"] == 1]
    assert tok.decode(trained) == "Grüß dich!\n5\n"  # specials (<|im_end|>, eos) decode to ""
    assert np.count_nonzero(trained == tok.piece_to_id("<|im_end|>")) == 2
    assert tok.decode(plain_record["tokens"][plain_record["loss_mask"] == 1]) == " 2"  # unchanged

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}] * 2}) + "\n", encoding="utf-8")
    raising = {**CHATML_SETTINGS, "chat_template": "{{ raise_exception('no two users in a row') }}"}
    config = _sft_config(tmp_path, bad, _hf_dir(tmp_path / "raising", raising))
    with pytest.raises(
        JaxgenError, match=r"bad.jsonl:1: .*raising/tokenizer_config.json: chat template raised"
    ):
        prepare(config, progress=False)


def _sft_config(tmp_path, path, tok_dir):
    return load_config(
        None,
        [
            f"data.train_files={json.dumps([str(path)])}", f"data.data_dir={tmp_path / 'prepared'}",
            f"tokenizer.path={tok_dir}", "data.format=sft", "data.validation_fraction=0", "train.seq_len=128",
        ],
    )  # fmt: skip


# ----------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = load_config(None, ["model.preset=tiny", "model.dtype=float32", "generate.max_new_tokens=2"])
    params = jax.jit(init_params, static_argnums=0)(config.model, jax.random.key(0))
    return config, params, tmp_path_factory.mktemp("chat")


def test_chat_prompts_with_the_generation_prompt(tiny):
    config, params, root = tiny
    lm = LanguageModel(config, params, HFTokenizer(_hf_dir(root / "llama3", LLAMA3_SETTINGS)))
    tok = lm.tokenizer
    user = [{"role": "user", "content": "Hi"}]
    h = _llama3_header
    want, _ = _expected(tok, [("<|begin_of_text|>" + h("user") + "Hi<|eot_id|>" + h("assistant"), 0)])
    [result] = lm.chat([user], temperature=0.0)
    assert result.prompt_tokens == want
    # without a template: the run's data.turn_header / turn_separator, the reply's header last
    plain = LanguageModel(
        config, params, HFTokenizer(_hf_dir(root / "plain", {"bos_token": "<|begin_of_text|>"}))
    )
    assert plain.chat_prompt(user) == [
        tok.bos_id,
        *tok.encode("user: "),
        *tok.encode("Hi\n"),
        *tok.encode("assistant: "),
    ]
    for bad, message in [
        (user, r"conversations: expected a list of conversations"),
        ([[{"role": "user"}]], r"conversation 0: message 0 needs a string 'role' and 'content'"),
        ([[]], r"conversation 0: expected a non-empty list of messages"),
    ]:
        with pytest.raises(JaxgenError, match=message):
            lm.chat(bad)


def test_cli_generate_chat_from_a_run_directory(tiny, tmp_path, capsys):
    config, params, _ = tiny
    run = save_params(
        tmp_path / "run", config, params, tokenizer_path=_hf_dir(tmp_path / "tok", CHATML_SETTINGS)
    )
    assert cli.main(["generate", "--run", str(run), "--prompt", "Hi", "--chat", "--temperature", "0"]) == 0
    lm = LanguageModel(config, params, HFTokenizer(run))  # the run's copy of tokenizer_config.json
    [want] = lm.chat([[{"role": "user", "content": "Hi"}]], temperature=0.0)
    assert capsys.readouterr().out == "Hi\n" + want.text + "\n"  # the user's text, then the reply

    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    lines = [
        {"id": 0, "messages": [{"role": "user", "content": "Hi"}]},
        {"id": 1, "prompt": "Hi"},  # --chat: one user turn
        {"id": 2, "messages": [{"role": "user"}]},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    summary = generate_jsonl.run(lm, prompts, out, {"temperature": 0.0}, progress=False, chat=True)
    assert summary.written == 2 and summary.failures == [
        f"{prompts}:3: messages: message 0 needs a string 'role' and 'content'"
    ]
    written = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    completions = generate_jsonl.postprocess([want.text], lm.config.generate)
    assert written[0]["completions"] == written[1]["completions"] == completions
    assert written[0]["messages"] == lines[0]["messages"] and written[1]["prompt"] == "Hi"
