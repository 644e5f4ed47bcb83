"""Load utterances through Hugging Face ``datasets``: local audiofolder directories, CSV files and
``load_dataset`` names or hub-layout directories. Audio is decoded by torchcodec through
``Audio(sampling_rate=16000)`` and channels are averaged, so every source ends up float32 mono 16 kHz; unreadable, empty
and silent files are DataErrors naming the file (or skipped and counted with ``skip_bad``)."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mla_registry.errors import DataError, InstallError
from mla_registry.storage import cache_dir

from .utterance import SAMPLE_RATE, Utterance

SILENCE_PEAK = 1e-4
# Audio shorter than this holds no word (a syllable lasts about 0.2 s), yet Whisper would still produce a
# hypothesis that gets scored as an utterance's (a 1-sample file used to be accepted and transcribed)
MIN_SECONDS = 0.1
TEXT_COLUMNS = ("transcription", "text", "sentence", "normalized_text")


@contextlib.contextmanager
def quiet_datasets(quiet: bool) -> Iterator[None]:
    """Silence ``datasets``' own progress bars while loading when ``quiet``."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    if quiet and was:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and was:
            datasets.enable_progress_bars()


def target_feature() -> Any:
    """The Audio feature every audio column is cast to: 16 kHz (torchcodec resamples). Channels are kept and
    averaged afterwards: ffmpeg's own stereo-to-mono downmix is constant-power (each channel times 0.707), which
    makes a centred stereo signal louder than either channel (and can push it past full scale)."""
    from datasets import Audio

    return Audio(sampling_rate=SAMPLE_RATE)


def _required(package: str) -> str:
    """The range of ``package`` this mla-registry declares (its metadata), e.g. ``torchcodec>=0.13.0,<=0.13.0``."""
    import importlib.metadata

    try:
        for req in importlib.metadata.requires("mla-registry") or []:
            if req.split(";")[0].replace(" ", "").lower().startswith(package):
                return req.split(";")[0].strip()
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        pass
    return package


@functools.cache
def check_decoder() -> None:
    """Prove the audio decoder loads by decoding a tiny WAV in memory, once per process. A torchcodec that does
    not load (a release built for another torch, FFmpeg's libraries missing) is an :class:`InstallError` naming
    the package and the fix; left to the per-file decoding it would read as 'audio file ... cannot be decoded'."""
    import wave

    import torch

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.sin(np.arange(160) / 3.0) * 8000).astype("<i2").tobytes())
    fix = (f"install the torchcodec built for torch {torch.__version__.split('+')[0]} (pip install "
           f"'{_required('torchcodec')}', as pyproject.toml declares) and FFmpeg's shared libraries "
           "(Debian/Ubuntu: apt-get install ffmpeg)")
    try:
        from torchcodec.decoders import AudioDecoder

        AudioDecoder(buf.getvalue()).get_all_samples()
    except ImportError as e:
        raise InstallError(f"the audio decoder torchcodec cannot be imported ({_short(e)}): {fix}") from None
    except Exception as e:  # noqa: BLE001 - whatever the native loader raises, it is the installation
        import importlib.metadata

        raise InstallError(
            f"the audio decoder torchcodec {importlib.metadata.version('torchcodec')} does not load with torch "
            f"{torch.__version__}: {_short(e)}. This is an installation problem, not a bad audio file: {fix}"
        ) from None


def check_audio(samples: np.ndarray) -> str | None:
    """Why ``samples`` is unusable (empty, non-finite, silent), or None when it is fine."""
    if samples.size == 0:
        return "empty (zero samples)"
    if samples.size < MIN_SECONDS * SAMPLE_RATE:
        return (f"too short to be an utterance ({samples.size} samples, {samples.size / SAMPLE_RATE * 1000:.1f} ms; "
                f"at least {MIN_SECONDS} s)")
    if not np.all(np.isfinite(samples)):
        return "contains NaN or infinite samples"
    peak = float(np.max(np.abs(samples)))
    if peak < SILENCE_PEAK:
        return f"silent (peak amplitude {peak:.2g} < {SILENCE_PEAK:g})"
    return None


def decoded_to_array(decoded: Any) -> np.ndarray:
    """A datasets-decoded audio value (torchcodec AudioDecoder, or a dict with array/sampling_rate) to a float32
    mono 16 kHz array; raises on anything else."""
    if hasattr(decoded, "get_all_samples"):
        s = decoded.get_all_samples()
        data, rate = s.data.numpy(), int(s.sample_rate)
    elif isinstance(decoded, dict) and "array" in decoded:
        data, rate = np.asarray(decoded["array"]), int(decoded["sampling_rate"])
    else:
        raise TypeError(f"unexpected decoded audio value of type {type(decoded).__name__}")
    if rate != SAMPLE_RATE:
        raise ValueError(f"decoder returned {rate} Hz instead of {SAMPLE_RATE} Hz")
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    return np.ascontiguousarray(data.reshape(-1), dtype=np.float32)


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    # torchcodec prefixes its messages with the C++ source location; keep the readable tail
    if "SingleStreamDecoder" in msg and ", " in msg:
        msg = msg.split(", ", 2)[-1]
    if "No audio frames were decoded" in msg:
        return "no audio frames (empty)"
    return (msg[:200] + "...") if len(msg) > 200 else msg


def _where(raw_audio: Any, index: int) -> str:
    path = raw_audio.get("path") if isinstance(raw_audio, dict) else None
    if path and (raw_audio.get("bytes") is None):
        return f"audio file {path}"
    return f"row {index}" + (f" (audio {path})" if path else "")


def rows_to_utterances(
    ref: str,
    ds: Any,
    *,
    audio_col: str,
    text_col: str,
    ids: list[str] | None = None,
    id_of: Any = None,
    voice_col: str | None = None,
    source_col: str | None = None,
    default_voice: str = "unknown",
    default_source: str = "",
    limit: int | None = None,
    skip_bad: bool = False,
    quiet: bool = False,
    lazy: bool = False,
    allow_empty: bool = False,
) -> list[Utterance]:
    """Decode the rows of a ``datasets`` Dataset (or IterableDataset) whose ``audio_col`` is cast to
    :func:`target_feature` into Utterances. ``ids`` gives the id per row, else ``id_of(row, index)``.

    ``lazy``: read ids and transcripts now and each file's audio only when it is asked for (a bad file is then a
    DataError at that point, naming it). Streamed datasets and ``skip_bad`` (which must read every file to find
    the bad ones) are read eagerly. No usable row is a DataError, except with ``allow_empty`` (one rank's share
    of a streamed dataset may be empty)."""
    from datasets import Audio
    from tqdm.auto import tqdm

    check_decoder()
    feature = target_feature()
    ds = ds.cast_column(audio_col, feature)
    raw_ds = ds.cast_column(audio_col, Audio(decode=False))
    streaming = not hasattr(ds, "__len__")
    total = None if streaming else len(ds)
    if limit is not None and total is not None:
        total = min(total, limit) if not skip_bad else total

    out: list[Utterance] = []
    bad: list[str] = []
    seen: dict[str, int] = {}
    rows: Iterable[Any] = raw_ds if streaming else range(len(ds))
    bar = tqdm(rows, total=total, desc=f"loading {ref}", unit="utt", disable=quiet, leave=False)
    try:
        for index, item in enumerate(bar):
            if limit is not None and len(out) >= limit:
                break
            raw = item if streaming else raw_ds[index]
            where = _where(raw[audio_col], index)
            uid = ids[index] if ids is not None else id_of(raw, index)
            problem = None
            text = raw.get(text_col)
            audio = None
            if not isinstance(text, str) or not text.strip():
                problem = f"has an empty or missing transcript in column {text_col!r}"
            elif lazy and not streaming and not skip_bad:
                pass  # decoded when asked for
            else:
                try:
                    decoded = feature.decode_example(raw[audio_col]) if streaming else ds[index][audio_col]
                    audio = decoded_to_array(decoded)
                except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unreadable
                    problem = f"cannot be decoded: {_short(e)}"
                else:
                    problem = check_audio(audio)
                    problem = f"is {problem}" if problem else None
            if problem is not None:
                msg = f"{ref}: {where} (id {uid!r}) {problem}"
                if not skip_bad:
                    raise DataError(msg + " (pass skip_bad=True to skip bad files)")
                bad.append(where)
                continue
            if uid in seen:
                raise DataError(f"{ref}: duplicate utterance id {uid!r} (rows {seen[uid]} and {index})")
            seen[uid] = index
            voice = raw.get(voice_col) if voice_col else None
            source = raw.get(source_col) if source_col else None
            loader = None if audio is not None else _row_loader(ref, ds, audio_col, index, where, uid)
            out.append(
                Utterance(
                    id=str(uid),
                    audio=audio,
                    text=text.strip(),
                    voice=str(voice) if voice not in (None, "") else default_voice,
                    source=str(source) if source not in (None, "") else default_source,
                    loader=loader,
                )
            )
    finally:
        bar.close()
    shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
    if not out and not allow_empty:  # an empty test set would score as WER 0: never a result
        raise DataError(f"{ref}: every one of its {len(bad)} audio files is bad (skipped: {shown}); no utterance "
                        "is left" if bad else f"{ref}: lists no utterances")
    if bad:
        warnings.warn(f"{ref}: skipped {len(bad)} bad audio file(s): {shown}", stacklevel=3)
    return out


def _row_loader(ref: str, ds: Any, audio_col: str, index: int, where: str, uid: str):
    """Decode row ``index`` of ``ds`` when called; a DataError naming the file when it cannot be used."""

    def load() -> np.ndarray:
        try:
            audio = decoded_to_array(ds[index][audio_col])
        except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unreadable
            raise DataError(f"{ref}: {where} (id {uid!r}) cannot be decoded: {_short(e)}") from None
        problem = check_audio(audio)
        if problem:
            raise DataError(f"{ref}: {where} (id {uid!r}) is {problem}")
        return audio

    return load


def _local_cache() -> str:
    return str(cache_dir("hf-datasets"))


def _pick_split(ref: str, dd: Any, split: str | None, hint: str = "name one with split=NAME") -> Any:
    names = list(dd.keys())
    if split is not None:
        if split not in dd:
            raise DataError(f"{ref}: no split {split!r}; available: {', '.join(names)}")
        return dd[split]
    if len(names) == 1:
        return dd[names[0]]
    raise DataError(f"{ref}: the dataset has several splits ({', '.join(names)}); {hint}")


def _check_metadata(ref: str, root: Path) -> list[str]:
    """Columns of the audiofolder's metadata.csv files; a clear DataError when one is missing or malformed."""
    found = sorted(root.rglob("metadata.csv"))
    if not found:
        if any(root.rglob("metadata.jsonl")):
            return []  # let datasets read JSON lines metadata; column checks happen on the loaded dataset
        raise DataError(f"{ref}: no metadata.csv in {root} (an audiofolder needs metadata.csv with columns "
                        "file_name,transcription)")
    columns: list[str] = []
    for meta in found:
        try:
            # utf-8-sig: spreadsheets save CSV with a byte-order mark, which would glue itself to the first column
            with open(meta, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, [])
                rows = sum(1 for row in reader if any(cell.strip() for cell in row))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{ref}: cannot read {meta}: {e}") from e
        for col in ("file_name", "transcription"):
            if col not in header:
                raise DataError(f"{ref}: {meta} has no {col!r} column (columns: {', '.join(header) or 'none'})")
        if not rows:
            raise DataError(f"{ref}: {meta} lists no audio files (a header and no rows)")
        columns = header
    return columns


def open_audiofolder(ref: str, directory: str, quiet: bool = False) -> tuple[Any, str, Any]:
    """(dataset, text column, id function) of a local audiofolder, through
    ``load_dataset("audiofolder", data_dir=...)``."""
    from datasets import load_dataset

    root = Path(directory)
    _check_metadata(ref, root)
    with quiet_datasets(quiet):
        try:
            dd = load_dataset("audiofolder", data_dir=str(root), cache_dir=_local_cache())
        except Exception as e:  # any failure to read the folder
            raise DataError(f"{ref}: datasets could not read the audiofolder {root}: {_short(e)}") from e
    ds = _pick_split(ref, dd, None, hint=f"load one with hf:{root}?split=NAME")
    if "audio" not in ds.column_names:
        raise DataError(f"{ref}: no audio files listed by {root}/metadata.csv")
    text_col = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if text_col is None:
        raise DataError(f"{ref}: no transcription column in the metadata of {root}")
    resolved = root.resolve()

    def id_of(raw: dict, index: int) -> str:
        if raw.get("id"):
            return str(raw["id"])
        path = (raw["audio"] or {}).get("path") or str(index)
        with contextlib.suppress(ValueError):
            path = Path(path).resolve().relative_to(resolved).as_posix()
        return str(Path(path).with_suffix("").as_posix())

    return ds, text_col, id_of


def load_audiofolder(
    ref: str, directory: str, *, limit: int | None = None, skip_bad: bool = False, quiet: bool = False,
    default_voice: str = "unknown", default_source: str | None = None, lazy: bool = False,
) -> list[Utterance]:
    """A local directory in the audiofolder layout (metadata.csv: file_name,transcription[,voice,source,id])."""
    ds, text_col, id_of = open_audiofolder(ref, directory, quiet)
    return rows_to_utterances(
        ref, ds, audio_col="audio", text_col=text_col, id_of=id_of,
        voice_col="voice" if "voice" in ds.column_names else None,
        source_col="source" if "source" in ds.column_names else None,
        default_voice=default_voice, default_source=default_source or Path(directory).name,
        limit=limit, skip_bad=skip_bad, quiet=quiet, lazy=lazy,
    )


def read_csv_rows(ref: str, path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a dataset CSV, checked for ``file_name`` and ``transcription`` columns."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a column name
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{ref}: cannot read CSV {path}: {e}") from e
    for col in ("file_name", "transcription"):
        if col not in header:
            raise DataError(f"{ref}: CSV {path} has no {col!r} column (columns: {', '.join(header) or 'none'})")
    for i, row in enumerate(rows):
        if not row.get("file_name"):
            raise DataError(f"{ref}: CSV {path} line {i + 2}: empty file_name")
    if not rows:
        raise DataError(f"{ref}: CSV {path} lists no audio files (a header and no rows)")
    return header, rows


def describe_csv(ref: str, path: str) -> dict[str, Any]:
    """Size, fingerprint and sources of a CSV dataset, read without decoding audio."""
    from collections import Counter

    from .utterance import fingerprint

    _, rows = read_csv_rows(ref, path)
    pairs = [(row.get("id") or Path(row["file_name"]).with_suffix("").as_posix(), row["transcription"].strip())
             for row in rows]
    default = Path(path).stem
    return {"ref": ref, "kind": "csv", "size": len(pairs), "seed": None, "fingerprint": fingerprint(pairs),
            "sources": dict(Counter(row.get("source") or default for row in rows)), "path": path}


def load_csv(
    ref: str, path: str, *, limit: int | None = None, skip_bad: bool = False, quiet: bool = False,
    lazy: bool = False,
) -> list[Utterance]:
    """A CSV file with ``file_name,transcription[,voice,source,id]``; file names relative to the CSV's folder."""
    from datasets import Dataset

    header, rows = read_csv_rows(ref, path)
    base = Path(path).resolve().parent
    files = [str((base / r["file_name"]).resolve()) for r in rows]
    ids = [r.get("id") or Path(r["file_name"]).with_suffix("").as_posix() for r in rows]
    data: dict[str, list[Any]] = {"audio": files, "transcription": [r["transcription"] for r in rows]}
    for col in ("voice", "source"):
        if col in header:
            data[col] = [r.get(col) or "" for r in rows]
    ds = Dataset.from_dict(data)
    return rows_to_utterances(
        ref, ds, audio_col="audio", text_col="transcription", ids=ids,
        voice_col="voice" if "voice" in header else None, source_col="source" if "source" in header else None,
        default_source=Path(path).stem, limit=limit, skip_bad=skip_bad, quiet=quiet, lazy=lazy,
    )


HF_OPTIONS: dict[str, str | None] = {
    "config": None, "split": None, "text": None, "audio": None, "id": None, "streaming": "false",
    "revision": None,
}


def open_hf(ref: str, name: str, opts: dict[str, str | None], quiet: bool = False) -> Any:
    """``datasets.load_dataset(name, config, split=split)`` with errors turned into DataErrors naming ``ref``."""
    from datasets import load_dataset

    streaming = str(opts["streaming"]).lower()
    if streaming not in ("true", "false", "1", "0", "yes", "no"):
        raise DataError(f"{ref}: streaming must be true or false, got {opts['streaming']!r}")
    kwargs: dict[str, Any] = {"streaming": streaming in ("true", "1", "yes")}
    if opts["revision"]:
        kwargs["revision"] = opts["revision"]
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local.resolve())
        kwargs["cache_dir"] = _local_cache()
    with quiet_datasets(quiet):
        try:
            dd = load_dataset(name, opts["config"], split=opts["split"], **kwargs)
        except Exception as e:  # network, missing dataset, bad config or split: all DataErrors
            raise DataError(
                f"{ref}: datasets.load_dataset({name!r}, {opts['config']!r}, split={opts['split']!r}) failed: "
                f"{type(e).__name__}: {_short(e)}"
            ) from e
    if opts["split"] is None:
        dd = _pick_split(ref, dd, None)
    return dd


def hf_columns(ref: str, ds: Any, opts: dict[str, str | None]) -> tuple[str, str, str | None]:
    """(audio column, text column, id column or None) of a loaded hub dataset."""
    from datasets import Audio

    features = ds.features or {}
    cols = list(features)
    audio_col = opts["audio"]
    if audio_col is None:
        audio_col = "audio" if "audio" in cols else next((c for c, f in features.items() if isinstance(f, Audio)),
                                                        None)
        if audio_col is None:
            raise DataError(f"{ref}: no audio column found (columns: {', '.join(cols)}); name it with audio=COLUMN")
    elif audio_col not in cols:
        raise DataError(f"{ref}: audio column {audio_col!r} not found (columns: {', '.join(cols)})")
    text_col = opts["text"]
    if text_col is None:
        text_col = next((c for c in ("text", *TEXT_COLUMNS) if c in cols), None)
        if text_col is None:
            raise DataError(f"{ref}: no text column found (tried text, sentence, transcription, normalized_text; "
                            f"columns: {', '.join(cols)}); name it with text=COLUMN")
    elif text_col not in cols:
        raise DataError(f"{ref}: text column {text_col!r} not found (columns: {', '.join(cols)})")
    id_col = opts["id"]
    if id_col is not None and id_col not in cols:
        raise DataError(f"{ref}: id column {id_col!r} not found (columns: {', '.join(cols)})")
    if id_col is None and "id" in cols:
        id_col = "id"
    return audio_col, text_col, id_col


def load_hf(
    ref: str, name: str, opts: dict[str, str | None], *, limit: int | None = None, skip_bad: bool = False,
    quiet: bool = False, lazy: bool = False,
) -> list[Utterance]:
    """A ``datasets.load_dataset`` name or hub-layout directory. Streamed under torchrun, each rank reads only its
    own shard (``datasets.distributed.split_dataset_by_node``); the result is then marked ``sharded``."""
    from mla_registry import distributed

    ds = open_hf(ref, name, opts, quiet)
    world = distributed.world()
    sharded = world.size > 1 and not hasattr(ds, "__len__")
    if sharded:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=world.rank, world_size=world.size)
    audio_col, text_col, id_col = hf_columns(ref, ds, opts)
    cols = list(ds.features or {})
    voice_col = "voice" if "voice" in cols else ("speaker_id" if "speaker_id" in cols else None)

    def id_of(raw: dict, index: int) -> str:
        return str(raw[id_col]) if id_col and raw.get(id_col) is not None else str(index)

    utts = rows_to_utterances(
        ref, ds, audio_col=audio_col, text_col=text_col, id_of=id_of, voice_col=voice_col,
        source_col="source" if "source" in cols else None,
        default_source=os.path.basename(name.rstrip("/")) + (f"/{opts['config']}" if opts["config"] else ""),
        limit=limit, skip_bad=skip_bad, quiet=quiet, lazy=lazy, allow_empty=sharded,
    )
    if voice_col == "speaker_id":
        for u in utts:
            u.voice = f"speaker:{u.voice}" if u.voice != "unknown" else u.voice
    return ShardedUtterances(utts) if sharded else utts


class ShardedUtterances(list):
    """This rank's share of a streamed dataset: evaluation decodes all of it and gathers across ranks."""

    sharded = True


def describe_dataset(ref: str, kind: str, target: str, opts: dict[str, str | None] | None) -> dict[str, Any]:
    """Size, fingerprint and sources of an audiofolder or hub dataset, read without decoding audio (a streaming
    dataset is not iterated: its size and fingerprint are None)."""
    from collections import Counter

    from datasets import Audio

    from .utterance import fingerprint

    if kind == "audiofolder":
        ds, text_col, id_of = open_audiofolder(ref, target, quiet=True)
        audio_col, default_source = "audio", Path(target).name
    else:
        assert opts is not None
        ds = open_hf(ref, target, opts, quiet=True)
        audio_col, text_col, id_col = hf_columns(ref, ds, opts)
        default_source = os.path.basename(target.rstrip("/")) + (f"/{opts['config']}" if opts["config"] else "")

        def id_of(raw: dict, index: int) -> str:
            return str(raw[id_col]) if id_col and raw.get(id_col) is not None else str(index)

    out: dict[str, Any] = {"ref": ref, "kind": kind, "size": None, "seed": None, "fingerprint": None,
                           "path": target}
    if kind == "hf":
        out.update(config=opts["config"], split=opts["split"], revision=opts["revision"])
    if not hasattr(ds, "__len__"):
        out["streaming"] = True
        return out
    raw_ds = ds.cast_column(audio_col, Audio(decode=False))
    pairs, sources = [], Counter()
    for index, raw in enumerate(raw_ds):
        text = raw.get(text_col)
        pairs.append((id_of(raw, index), text.strip() if isinstance(text, str) else ""))
        sources[str(raw.get("source") or default_source)] += 1
    out.update(size=len(pairs), fingerprint=fingerprint(pairs), sources=dict(sources))
    return out
