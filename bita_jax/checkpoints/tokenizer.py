"""Tokenizer for bita_jax: HF tokenizers from a model directory, or built offline from a GGUF file.

For a GGUF file the byte-level BPE is rebuilt from the metadata (`tokenizer.ggml.tokens`, `merges`,
`token_type`, special ids, `tokenizer.chat_template`) as a `tokenizers.Tokenizer`, wrapped in a
`transformers.PreTrainedTokenizerFast` so chat templates render through HF's own Jinja code.
Nothing is downloaded and torch is never imported.

Pre-tokenization follows `tokenizer.ggml.pre`. For "smollm" (and llama.cpp's other
"\\p{N} then GPT-2 regex" types) it is Digits(individual) followed by the GPT-2 ByteLevel regex,
as in SmolLM2's own tokenizer.json and llama.cpp. transformers' GGUF converter ignores this key
and uses plain ByteLevel, so it splits a run of 2+ whitespace characters before a digit
differently ("a  1": HF-GGUF [a, Ġ, Ġ, 1], the model's tokenizer [a, ĠĠ, 1]); everywhere else
the two agree.

Building it from the metadata means parsing the whole GGUF and ~100k vocab/merge strings, so the
built tokenizer is cached on disk next to the GGUF's tensor cache (see `model_cache`):
`tokenizer.json` (`tokenizers.Tokenizer.to_str`) plus `tokenizer_meta.json` (special tokens, chat
template and the sha256 of `tokenizer.json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bita_jax.checkpoints import gguf_loader, model_cache

# llama.cpp pre-tokenizer types whose regex list is ["\p{N}", GPT-2 regex].
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
_GPT2_PRES = ("gpt2", "gpt-2", "mpt", "olmo", "jais")
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_CACHE_FILE = "tokenizer.json"
TOKENIZER_META_CACHE_FILE = "tokenizer_meta.json"
_META_FORMAT = "bita_jax.gguf_tokenizer"

Message = Mapping[str, str]


class Tokenizer:
    """A thin wrapper over a HF fast tokenizer with the calls bita_jax needs.

    Attributes:
      hf: the underlying `transformers` tokenizer.
      eos_token_ids: ids that end generation (tokenizer EOS, plus generation_config's for HF dirs).
    """

    def __init__(self, hf: PreTrainedTokenizerBase, eos_token_ids: Sequence[int] = ()):
        self.hf = hf
        ids = list(eos_token_ids) or ([hf.eos_token_id] if hf.eos_token_id is not None else [])
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token strings are parsed; BOS only where the tokenizer adds one."""
        return list(self.hf.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _messages(self, messages: str | Sequence[Message], system: str | None) -> list[dict]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = [dict(m) for m in messages]
        if system is not None:
            if messages and messages[0].get("role") == "system":
                raise ValueError("system= given but messages already start with a system message")
            messages.insert(0, {"role": "system", "content": system})
        if self.hf.chat_template is None:
            raise ValueError(f"tokenizer {self.hf.name_or_path!r} has no chat template")
        return messages

    def apply_chat_template(self, messages: str | Sequence[Message], system: str | None = None,
                            add_generation_prompt: bool = True) -> str:
        """Renders a chat exactly as HF `apply_chat_template(..., tokenize=False)` does.

        Args:
          messages: a user turn as a string, or a list of {"role", "content"} dicts.
          system: an optional system message to prepend. None keeps the template's default (for
            SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
          add_generation_prompt: end with the assistant header.
        """
        return self.hf.apply_chat_template(self._messages(messages, system), tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: str | Sequence[Message], system: str | None = None,
                 add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat prompt, equal to HF `apply_chat_template(..., tokenize=True)`.

        Returns:
          [P] prompt ids (special tokens such as <|im_start|> as single ids, no extra BOS).
        """
        return list(self.hf.apply_chat_template(
            self._messages(messages, system), tokenize=True, return_dict=False,
            add_generation_prompt=add_generation_prompt))


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_PRES or pre is None:
        return byte_level
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: "
                     f"{', '.join(_DIGIT_SPLIT_PRES + _GPT2_PRES)})")


def tokenizer_from_gguf(path: str | os.PathLike, reader: gguf_loader.ReaderArg = None, *,
                        use_cache: bool = True) -> Tokenizer:
    """Builds the byte-level BPE tokenizer stored in a GGUF file's metadata, offline.

    Args:
      path: a `.gguf` file.
      reader: an open reader for `path`, or a function returning one (`gguf_loader.lazy_reader`),
        to share one parse of the file; opened here when needed if None.
      use_cache: False to neither read nor write the on-disk cache (`BITA_JAX_NO_CACHE=1` too).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: unreadable file, or a tokenizer model other than GPT-2 byte-level BPE.
    """
    entry = model_cache.cache_entry(path) if use_cache else None
    built = _read_cached_tokenizer(entry) if entry is not None else None
    if built is None:
        built = _build_tokenizer(gguf_loader.resolve_reader(path, reader), path)
        if entry is not None:
            _write_cached_tokenizer(entry, *built)
    tk, kwargs = built
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False,
                                 name_or_path=str(path), **kwargs)
    return Tokenizer(hf)


def _build_tokenizer(reader, path) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """The `tokenizers.Tokenizer` and the `PreTrainedTokenizerFast` special-token/template args."""

    def get(key: str, default: Any = None) -> Any:
        return gguf_loader.field(reader, f"tokenizer.{key}", default)

    kind = get("ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r} (only 'gpt2' BPE)")
    tokens = get("ggml.tokens")
    types = get("ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in get("ggml.merges", [])]
    tk = tokenizers.Tokenizer(models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
        continuing_subword_prefix="", end_of_word_suffix=""))
    tk.pre_tokenizer = _pre_tokenizer(get("ggml.pre"))
    tk.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole in any text and skipped on request.
    for kind_id, add in ((_TOKEN_TYPE_CONTROL, tk.add_special_tokens),
                         (_TOKEN_TYPE_USER_DEFINED, tk.add_tokens)):
        add([tokenizers.AddedToken(tokens[i], special=kind_id == _TOKEN_TYPE_CONTROL,
                                   normalized=False)
             for i, t in enumerate(types) if t == kind_id])

    def special(key: str) -> str | None:
        i = get(f"ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = special("bos")
    if get("ggml.add_bos_token", False) and bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, get("ggml.bos_token_id"))])
    kwargs = {"bos_token": bos, "eos_token": special("eos"), "unk_token": special("unknown"),
              "pad_token": special("padding"), "chat_template": get("chat_template")}
    return tk, kwargs


def _read_cached_tokenizer(entry: pathlib.Path
                           ) -> tuple[tokenizers.Tokenizer, dict[str, Any]] | None:
    """The cached (tokenizer, kwargs) of a GGUF cache entry; None if absent or unreadable."""
    meta_file = entry / TOKENIZER_META_CACHE_FILE
    if not meta_file.is_file():
        return None
    file = meta_file
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format") != _META_FORMAT:
            raise ValueError(f"not a {_META_FORMAT} file")
        file = entry / TOKENIZER_CACHE_FILE
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"{TOKENIZER_CACHE_FILE} does not match its recorded sha256")
        kwargs = meta["kwargs"]
        if set(kwargs) != {"bos_token", "eos_token", "unk_token", "pad_token", "chat_template"}:
            raise ValueError("bad kwargs")
        return tokenizers.Tokenizer.from_str(data.decode("utf-8")), kwargs
    except Exception as e:  # any damage: rebuild, never crash
        model_cache.warn_unreadable(file, e)
        if file != meta_file:
            with contextlib.suppress(OSError):
                meta_file.unlink(missing_ok=True)
        return None


def _write_cached_tokenizer(entry: pathlib.Path, tk: tokenizers.Tokenizer,
                            kwargs: dict[str, Any]) -> None:
    # The meta file (with the sha256 of tokenizer.json) is written last: it commits the pair.
    data = tk.to_str().encode("utf-8")
    meta = {"format": _META_FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "kwargs": kwargs}
    if model_cache.write_cache_file(entry / TOKENIZER_CACHE_FILE, data):
        model_cache.write_cache_file(entry / TOKENIZER_META_CACHE_FILE,
                                     json.dumps(meta).encode("utf-8"))


def _generation_eos(directory: pathlib.Path) -> list[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    eos: Any = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def load_tokenizer(source: str | os.PathLike | None = None) -> Tokenizer:
    """Loads a tokenizer from a GGUF file or a local HF model directory, never downloading.

    Args:
      source: a `.gguf` file, a HF model directory, or None for the bundled SmolLM2 GGUF.

    Raises:
      FileNotFoundError: `source` is missing, or a directory without tokenizer files.
      ValueError: an unreadable or unsupported GGUF file.
    """
    path = gguf_loader.find_smollm2_gguf() if source is None else pathlib.Path(source)
    if path.is_dir():
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(f"no tokenizer in directory {path}: expected one of "
                                    f"{', '.join(_TOKENIZER_FILES)}")
        # Imported here: `transformers.AutoTokenizer` pulls in torch whenever it is installed.
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        eos = _generation_eos(path)
        if hf.eos_token_id is not None:
            eos.insert(0, hf.eos_token_id)
        return Tokenizer(hf, eos)
    return tokenizer_from_gguf(path)
