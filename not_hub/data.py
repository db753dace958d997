"""Text for training and evaluation: load documents, split them by document, tokenise and pack into blocks.

Documents come from a Hub dataset id, a local text / jsonl / json file or folder, or a list of strings, always
through `datasets`. Splits are made **by document** (seeded, reproducible), so no held-out document is ever seen in
training; blocks are packed *within* a split only.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from .errors import DataError, DataFileNotFoundError, InvalidArgumentError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".java", ".cs", ".py")


def load_documents(
    source: str | os.PathLike | list[str],
    *,
    text_field: str = "text",
    split: str = "train",
    unit: str | None = None,
    limit: int | None = None,
    revision: str | None = None,
    suffixes: tuple[str, ...] = TEXT_SUFFIXES,
) -> list[str]:
    """Load documents as a list of strings.

    Args:
        source: a list of strings; a local file (`.txt`-like, `.jsonl`, `.json`); a local folder (every text file
            is one document, or one per line/paragraph with `unit`); or a Hub dataset id.
        text_field: the column holding the text (json/jsonl files and Hub datasets).
        split: the split of a Hub dataset.
        unit: how a text file is cut into documents: "file" (the whole file), "line" (one per non-empty line, e.g.
            one function per line) or "paragraph" (blank-line separated). Default: "file" inside folders,
            "paragraph" for a single file.
        limit: keep at most this many documents (the first ones).
        revision: the Hub dataset's revision.
        suffixes: which files of a folder are text documents.

    Returns:
        Non-empty documents, in source order.
    """
    if isinstance(source, (list, tuple)):
        docs = [str(d) for d in source]
    else:
        docs = _read_source(
            source, text_field=text_field, split=split, unit=unit, revision=revision, suffixes=suffixes
        )
    docs = [d.strip() for d in docs if d and d.strip()]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgumentError(f"limit={limit!r} is not allowed; expected an integer >= 1, or None")
        docs = docs[:limit]
    if not docs:
        raise DataError(f"{_name(source)} holds no text (it is empty or blank); pass a file with documents in it")
    return docs


def _name(source) -> str:
    return f"{len(source)} strings" if isinstance(source, (list, tuple)) else repr(str(source))


def _read_source(source, *, text_field, split, unit, revision, suffixes) -> list[str]:
    """Read one file, folder or Hub dataset through `datasets`; any failure is a `DataError` naming the source."""
    path = Path(source)
    if path.is_dir():
        files = _text_files(path, suffixes)
        return _cut(_load("text", source, data_files=files, sample_by="document")["text"], unit or "file")
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        ds = _load("json", source, data_files=str(path))
        if text_field not in ds.column_names:
            raise DataError(
                f"{path} has no field {text_field!r}; its fields are {ds.column_names} (pass --text-field / "
                "text_field=...)"
            )
        return _texts(ds[text_field], f"{path} field {text_field!r}")
    if path.is_file():
        return _cut(_load("text", source, data_files=str(path), sample_by="document")["text"], unit or "paragraph")
    if str(source).count("/") == 1 and not str(source).startswith((".", "/")) and not path.exists():
        ds = _load(str(source), source, split=split, revision=revision)
        if text_field not in ds.column_names:
            raise DataError(f"dataset {source!s} has no column {text_field!r}; its columns are {ds.column_names}")
        return _texts(ds[text_field], f"dataset {source!s} column {text_field!r}")
    raise DataFileNotFoundError(f"{source!s} is neither a file, a folder nor a Hub dataset id ('namespace/name')")


def _text_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Every text file under `folder`, sorted; none is a `DataFileNotFoundError`."""
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataFileNotFoundError(f"{folder} holds no text files ({', '.join(suffixes)})")
    return files


def _check_fractions(validation: float, test: float) -> None:
    for name, value in (("validation", validation), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise InvalidArgumentError(f"{name}={value!r} is not a fraction in [0, 1)")
    if validation + test >= 1:
        raise InvalidArgumentError(
            f"validation={validation} and test={test} leave no training documents; keep the sum < 1"
        )


def _texts(values, where: str) -> list[str]:
    """The text values of a column; a number, list or object is refused, not trained on as its Python repr."""
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"{where} holds a value of type {type(value).__name__} in record {i} ({str(value)[:60]!r}), not "
                "text; point --text-field / text_field= at a field of strings"
            )
    return [t for t in values if t is not None]


def _load(builder: str, source, **kwargs) -> datasets.Dataset:
    kwargs.setdefault("split", "train")
    try:
        return datasets.load_dataset(builder, **kwargs)
    except Exception as err:  # datasets wraps decoding/parsing/network failures in many types
        cause = err.__cause__ or err
        detail = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
        raise DataError(
            f"could not read documents from {source!s} ({type(cause).__name__}: {detail}); pass UTF-8 text, "
            ".jsonl/.json records, a folder of text files, or a reachable Hub dataset id"
        ) from None


def _cut(texts: list[str], unit: str) -> list[str]:
    if unit == "file":
        return list(texts)
    if unit == "line":
        return [line for text in texts for line in text.splitlines()]
    if unit == "paragraph":
        return [p for text in texts for p in text.replace("\r\n", "\n").split("\n\n")]
    raise InvalidArgumentError(f"unit={unit!r} is not one of 'file', 'line', 'paragraph'")


@dataclass
class DocumentSplits:
    """Train / validation / test documents, disjoint by document, with a description for the organ's metadata."""

    train: list[str]
    validation: list[str]
    test: list[str]
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        overlap = (set(self.train) & set(self.validation)) | (set(self.train) & set(self.test))
        if overlap:
            # Exact duplicates across splits would leak held-out text into training.
            self.validation = [d for d in self.validation if d not in set(self.train)]
            self.test = [d for d in self.test if d not in set(self.train)]
        self.description.setdefault("documents", {k: len(getattr(self, k)) for k in ("train", "validation", "test")})
        self.description["removed_cross_split_duplicates"] = len(overlap)


def split_documents(
    docs: list[str],
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    description: dict | None = None,
) -> DocumentSplits:
    """Shuffle documents with `seed` and cut them into train / validation / test by document.

    The result depends only on the documents and the seed (not on their order): each document is ranked by a seeded
    hash of its text.
    """
    _check_fractions(validation, test)
    unique = sorted(set(docs), key=lambda d: hashlib.sha256(f"{seed}|{d}".encode()).hexdigest())
    n_val, n_test = round(len(unique) * validation), round(len(unique) * test)
    if (validation and not n_val) or (test and not n_test) or len(unique) - n_val - n_test < 1:
        raise DataError(
            f"{len(unique)} distinct documents are too few for validation={validation}, test={test}: each split "
            "needs at least one document. Pass more documents, or held-out ones (--validation-data, --test-data)"
        )
    return DocumentSplits(
        train=unique[n_val + n_test :],
        validation=unique[:n_val],
        test=unique[n_val : n_val + n_test],
        description={"seed": seed, "validation_fraction": validation, "test_fraction": test, **(description or {})},
    )


# A document longer than this is tokenised in pieces (cut before a whitespace character near each boundary), so a
# one-line multi-megabyte file never becomes one tokenizer call holding millions of token objects at once.
_PIECE_CHARS = 1 << 16


def _pieces(text: str) -> list[str]:
    if len(text) <= _PIECE_CHARS:
        return [text]
    pieces, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        end = start + _PIECE_CHARS
        cut = max(text.rfind(" ", start + _PIECE_CHARS // 2, end), text.rfind("\n", start + _PIECE_CHARS // 2, end))
        cut = cut if cut > start else end  # no whitespace in the window: cut anywhere
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _with_eos(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), EOS after each: where one document ends in a packed stream.

    Ids are int32 arrays (4 bytes a token, not a Python int each). A document longer than 64K characters is tokenised
    in pieces cut before a whitespace character: tokenizers whose pre-tokenizer splits at whitespace (byte-level BPE,
    WordPiece, word-level) give the tokens of the whole document."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eos = np.asarray(eos, dtype=np.int32)
    short = [i for i, text in enumerate(texts) if len(text) <= _PIECE_CHARS]  # one batched call (fast, parallel)
    batch = tokenizer([texts[i] for i in short], add_special_tokens=False)["input_ids"] if short else []
    ids = dict(zip(short, batch, strict=True))
    out = []
    for i, text in enumerate(texts):
        if i in ids:
            parts = [ids.pop(i)]
        else:  # a long document: its pieces a few at a time (parallel in the tokenizer, bounded in memory)
            pieces = _pieces(text)
            parts = [
                piece_ids
                for k in range(0, len(pieces), 4)
                for piece_ids in tokenizer(pieces[k : k + 4], add_special_tokens=False)["input_ids"]
            ]
        out.append(np.concatenate([*(np.asarray(p, dtype=np.int32) for p in parts), eos]))
    return out


def _pack(documents: list, block_size: int) -> list[np.ndarray]:
    """The documents' tokens as one stream, cut into `block_size` blocks (a tail that fills none is dropped)."""
    if len(documents) == 0:
        return []
    stream = np.concatenate([np.asarray(ids, dtype=np.int32) for ids in documents])
    n = len(stream) // block_size
    return list(stream[: n * block_size].reshape(n, block_size))


def pack_blocks(
    docs: list[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    shuffle_seed: int | None = None,
) -> datasets.Dataset:
    """Tokenise documents (EOS after each) and pack the token stream into `block_size` blocks.

    Returns a `datasets.Dataset` with an `input_ids` column of equal-length blocks; the tail that does not fill a
    block is dropped. With `shuffle_seed`, documents are shuffled before packing (training data).
    """
    if shuffle_seed is not None:
        docs = list(docs)
        random.Random(shuffle_seed).shuffle(docs)
    ds = datasets.Dataset.from_dict({"text": list(docs)})

    def tokenize(batch):
        return {"input_ids": _with_eos(tokenizer, batch["text"])}

    def pack(batch):
        return {"input_ids": _pack(batch["input_ids"], block_size)}

    ds = ds.map(tokenize, batched=True, batch_size=64, remove_columns=["text"], desc="tokenising")
    # One packing batch over everything: blocks may span documents (standard causal-LM packing) but never splits.
    # Read as numpy arrays (not one Python int per token).
    ds = ds.with_format("numpy").map(pack, batched=True, batch_size=None, desc="packing")
    return ds.with_format("torch")


def tokenize_documents(docs: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each document (no special tokens), for evaluation that respects document boundaries."""
    return tokenizer(list(docs), add_special_tokens=False)["input_ids"]


@dataclass
class BlockData:
    """Packed token blocks for training (`train`) and validation (`validation`), with a description."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        if "block_size" in self.description:
            return self.description["block_size"]
        return len(self.train[0]["input_ids"])

    @property
    def streamed(self) -> bool:
        """Whether `train` is a stream (a `datasets.IterableDataset`, read once per epoch, never held in memory)."""
        return not hasattr(self.train, "__len__")


def make_blocks(
    splits: DocumentSplits,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 256,
    *,
    seed: int = 0,
    max_validation_blocks: int | None = None,
) -> BlockData:
    """Pack a split's train and validation documents into blocks (train documents shuffled with `seed`).

    `max_validation_blocks` keeps the first N validation blocks: validation runs at the start, every `eval_every`
    steps and at the end, so on a large corpus its whole split would cost more than the training it checks.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise InvalidArgumentError(
            f"block_size={block_size!r} is not allowed; expected an integer >= 2 (a block predicts each token "
            "from the ones before it)"
        )
    train = pack_blocks(splits.train, tokenizer, block_size, shuffle_seed=seed)
    if len(train) == 0:
        raise DataError(
            f"the training documents hold fewer than block_size={block_size} tokens; pass more text or a smaller "
            "block_size"
        )
    validation = pack_blocks(splits.validation, tokenizer, block_size) if splits.validation else None
    if max_validation_blocks is not None and validation is not None and len(validation) > max_validation_blocks:
        validation = validation.select(range(max_validation_blocks))
    description = {
        **splits.description,
        "block_size": block_size,
        "train_blocks": len(train),
        "validation_blocks": len(validation) if validation is not None else 0,
        "train_tokens": len(train) * block_size,
    }
    return BlockData(
        train=train,
        validation=validation if validation is not None and len(validation) else None,
        description=description,
    )


# ----------------------------------------------------------------------------------------------------- streaming


def _bucket(text: str, seed: int, validation: float, test: float) -> str:
    """Which split a document belongs to, from a seeded hash of its text alone: a stream can be split by document
    without holding it (the same document always lands in the same split, whatever the order or the corpus size)."""
    u = int.from_bytes(hashlib.sha256(f"{seed}|{text}".encode()).digest()[:8], "big") / 2**64
    return "validation" if u < validation else "test" if u < validation + test else "train"


def _stream_source(source, *, text_field, unit, split, revision, suffixes) -> datasets.IterableDataset:
    path = Path(source)
    try:
        if path.is_dir() or (path.is_file() and path.suffix not in (".json", ".jsonl")):
            files = _text_files(path, suffixes) if path.is_dir() else [str(path)]
            unit = unit or ("file" if path.is_dir() else "paragraph")
            sample_by = {"file": "document", "line": "line", "paragraph": "paragraph"}.get(unit)
            if sample_by is None:
                raise InvalidArgumentError(f"unit={unit!r} is not one of 'file', 'line', 'paragraph'")
            return datasets.load_dataset("text", data_files=files, sample_by=sample_by, streaming=True, split="train")
        if path.is_file():
            ds = datasets.load_dataset("json", data_files=str(path), streaming=True, split="train")
        elif str(source).count("/") == 1 and not str(source).startswith((".", "/")):
            ds = datasets.load_dataset(str(source), split=split, revision=revision, streaming=True)
        else:
            raise DataFileNotFoundError(f"{source!s} is neither a file, a folder nor a Hub dataset id")
    except (DataError, InvalidArgumentError):
        raise
    except Exception as err:  # datasets wraps decoding/parsing/network failures in many types
        raise DataError(f"could not stream documents from {source!s} ({type(err).__name__}: {err})") from None
    try:
        if text_field != "text":
            ds = ds.rename_column(text_field, "text")
        return ds.select_columns(["text"])
    except (ValueError, KeyError) as err:
        columns = list(ds.column_names or []) if ds.column_names else "unknown until read"
        raise DataError(
            f"{source!s} has no field {text_field!r} (columns: {columns}); pass --text-field / text_field= the column "
            f"that holds the text ({err})"
        ) from None


def stream_documents(
    sources: str | os.PathLike | list,
    *,
    bucket: str = "train",
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    text_field: str = "text",
    unit: str | None = None,
    split: str = "train",
    revision: str | None = None,
    suffixes: tuple[str, ...] = TEXT_SUFFIXES,
) -> datasets.IterableDataset:
    """The documents of one split of a corpus, as a `datasets` stream (nothing is read until iterated).

    A document goes to validation, test or train by a seeded hash of its text (`validation` / `test` are the
    expected shares), so splits are disjoint by document without ever holding the corpus.

    Args:
        sources: files (text, .jsonl, .json), folders, or Hub dataset ids; one or a list.
        bucket: "train", "validation" or "test".
        Others: as `load_documents` and `split_documents`.
    """
    if bucket not in ("train", "validation", "test"):
        raise InvalidArgumentError(f"bucket={bucket!r} is not one of 'train', 'validation', 'test'")
    _check_fractions(validation, test)
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    opts = dict(text_field=text_field, unit=unit, split=split, revision=revision, suffixes=suffixes)
    streams = [_stream_source(s, **opts) for s in items]
    ds = streams[0] if len(streams) == 1 else datasets.concatenate_datasets(streams)
    where = ", ".join(str(s) for s in items)

    def keep(example) -> bool:
        text = example.get("text")
        if text is not None and not isinstance(text, str):
            raise DataError(
                f"a document of {where} has a {type(text).__name__} in its text field {text_field!r}, not text; "
                "pass --text-field / text_field= the column that holds the text"
            )
        text = (text or "").strip()
        return bool(text) and _bucket(text, seed, validation, test) == bucket

    return _guarded(ds.filter(keep).map(lambda ex: {"text": ex["text"].strip()}), where, text_field)


def _guarded(ds: datasets.IterableDataset, where: str, text_field: str) -> datasets.IterableDataset:
    """`ds`, whose failures while it is read (lazily, inside training) become one named `DataError`: bytes that are
    not UTF-8, a missing text field, a file deleted or changed between passes."""

    def documents():
        try:
            yield from ds
        except DataError:
            raise
        except UnicodeDecodeError as err:
            raise DataError(
                f"{where} is not UTF-8 text ({err.reason} at byte {err.start}: binary, or another encoding such as "
                "latin-1); convert it (e.g. iconv -f latin1 -t utf-8) or leave that file out"
            ) from None
        except (FileNotFoundError, PermissionError) as err:
            raise DataError(
                f"could not read {where} while streaming it ({type(err).__name__}: {err}); a streamed corpus is read "
                "again on every pass and must stay in place until training ends"
            ) from None
        except KeyError as err:
            raise DataError(
                f"the documents of {where} have no field {err}; pass --text-field / text_field= the column that holds "
                "the text"
            ) from None
        except Exception as err:  # datasets wraps parse and read failures in many types
            raise DataError(f"could not stream documents from {where} ({type(err).__name__}: {err})") from None

    return datasets.IterableDataset.from_generator(documents)


def stream_blocks(
    sources: str | os.PathLike | list,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 256,
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    max_validation_blocks: int = 64,
    shuffle_buffer: int = 1000,
    text_field: str = "text",
    unit: str | None = None,
    split: str = "train",
    revision: str | None = None,
) -> BlockData:
    """Training blocks streamed from a corpus of any size, packed on the fly; validation blocks held in memory.

    The training split is a `datasets.IterableDataset`: documents are read, shuffled within a buffer of
    `shuffle_buffer` documents (seeded), tokenised (EOS after each) and packed into `block_size` blocks as training
    asks for them, so a corpus larger than memory trains in one pass. Packing runs over 256 documents at a time;
    the tail of each group that does not fill a block is dropped. Validation is the first `max_validation_blocks`
    blocks of the validation documents (split by document, see `stream_documents`).

    Train with a budget (`max_tokens`, `max_seconds` or `max_steps`): a stream has no length to lay a schedule on.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise InvalidArgumentError(f"block_size={block_size!r} is not allowed; expected an integer >= 2")
    opts = dict(validation=validation, test=test, seed=seed, text_field=text_field, unit=unit, split=split)
    opts["revision"] = revision

    def pack(batch):
        return {"input_ids": _pack(_with_eos(tokenizer, batch["text"]), block_size)}

    documents = stream_documents(sources, bucket="train", **opts)
    # Read the first training document now, not inside training: an empty or blank corpus, bytes that are not text
    # or a missing field are refused before anything is built.
    if next(iter(documents), None) is None:
        where = ", ".join(str(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources]))
        raise DataError(
            f"{where} holds no training documents: it is empty or blank, or every document fell in the validation "
            f"and test shares ({validation} + {test})"
        )
    train = documents.shuffle(seed=seed, buffer_size=shuffle_buffer)
    train = train.map(pack, batched=True, batch_size=256, remove_columns=["text"]).with_format("torch")
    held: list[np.ndarray] = []  # validation documents' token ids, read until they fill the blocks wanted
    tokens = 0
    if validation:
        for example in stream_documents(sources, bucket="validation", **opts):
            held += _with_eos(tokenizer, [example["text"]])
            tokens += len(held[-1])
            if tokens >= max_validation_blocks * block_size:
                break
    blocks = _pack(held, block_size)[:max_validation_blocks]
    valid = datasets.Dataset.from_dict({"input_ids": blocks}).with_format("torch") if blocks else None
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    description = {
        "sources": [str(s) for s in items],
        # What a run dir's identity knows a stream by (it is not read twice): names, sizes, modification times.
        "files": [_file_stamp(s) for s in items],
        "streamed": True,
        "split": "by document, seeded hash",
        "seed": seed,
        "validation_fraction": validation,
        "test_fraction": test,
        "block_size": block_size,
        "validation_blocks": len(valid) if valid is not None else 0,
        "shuffle_buffer": shuffle_buffer,
    }
    return BlockData(train=train, validation=valid, description=description)


def _file_stamp(source) -> dict[str, Any] | None:
    path = Path(source)
    if path.is_file():
        return {"path": str(path.resolve()), "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"path": str(path.resolve()), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return None
