"""Compressors for the lossless hidden codecs (bf16, fp32): disk against decode and encode speed, per candidate.

    python bench/hidden_compressors.py                               # synthetic LLM-like states, d=4096
    python bench/hidden_compressors.py --cache /work/q22/cache       # + a real teacher's states (bf16/fp32 cache)
    python bench/hidden_compressors.py --read                        # + each candidate's stored-precision read

Each candidate is a blosc setting (cname, clevel, shuffle, blocksize: what zarr's BloscCodec records in the
zarr.json of `hidden`, inside the shards, before the crc32c), applied to the inner chunks the writer cuts
(`plan_layout`). Per source and stored dtype it prints the compressed fraction (compressed / stored bytes) and
one thread's encode and decode GB/s of stored bytes, best of --repeats passes over all chunks, with blosc's
own threads off (as on the extraction writer thread, which compresses, and on the reader's decode pool, which
decompresses straight into the output: here into one reused buffer). Encoding must keep up with extraction;
decoding bounds what a reader delivers per thread.

Sources: (1) `synthetic_post_norm_states` (what bench/read_throughput.py and `genrecal-cache plan` use), all
rows (`--context full`); (1') the same as the default storage keeps them (`--context lowrank`: only the answer
rows, here 15% of each sample, hold states in `hidden`, the other rows are zeros); (2) `--cache`: the exact
states of a bf16 or fp32 cache (e.g. the tiny trained teacher of bench/quality.py, whose small synthetic tasks
repeat prompt prefixes, hence many repeated rows).
bf16 rows are the bf16 bits of the states (what the bf16 codec stores); fp32 rows only for float32 sources.

`--read` writes a bf16 cache of the synthetic states with each candidate (the bf16 codec with that chain) and
reads it in stored precision (`iter_samples(precision="stored")`) beside (c), a raw `np.fromfile` of the same
uncompressed bf16 bytes, in one run: the ratio issue 24 asks to be >= 0.8x.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numcodecs
import numcodecs.blosc
import numpy as np

from _machine import machine
from read_throughput import timed

from genrecal_cache import open_cache
from genrecal_cache.fidelity import synthetic_post_norm_states
from genrecal_cache.format.codecs import BloscSettings, float32_to_bf16_bits, hidden_codec
from genrecal_cache.format.layout import plan_layout

MIB = 1 << 20
# name -> (cname, clevel, shuffle, blocksize); blocksize 0: blosc picks it from clevel and the type size
CANDIDATES = {
    "zstd-1 shuffle 1M": BloscSettings("zstd", 1, "shuffle", MIB),
    "zstd-1 bitshuffle 1M": BloscSettings("zstd", 1, "bitshuffle", MIB),
    "lz4-1 shuffle 1M": BloscSettings("lz4", 1, "shuffle", MIB),
    "lz4-5 shuffle 1M": BloscSettings("lz4", 5, "shuffle", MIB),
    "lz4-9 shuffle 1M": BloscSettings("lz4", 9, "shuffle", MIB),
    "lz4-9 shuffle auto": BloscSettings("lz4", 9, "shuffle", 0),
    "lz4-5 bitshuffle 1M": BloscSettings("lz4", 5, "bitshuffle", MIB),
    "lz4-1 noshuffle 1M": BloscSettings("lz4", 1, "noshuffle", MIB),
    "lz4-9 noshuffle 1M": BloscSettings("lz4", 9, "noshuffle", MIB),
    "lz4hc-1 shuffle 1M": BloscSettings("lz4hc", 1, "shuffle", MIB),
    "blosclz-5 shuffle 1M": BloscSettings("blosclz", 5, "shuffle", MIB),
    "none (clevel 0)": BloscSettings("zstd", 0, "noshuffle", MIB),
}

def chunks_of(stored: np.ndarray, rows: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(stored[a:a + rows]) for a in range(0, len(stored) - rows + 1, rows)]


def measure(chunks: list[np.ndarray], s: BloscSettings, repeats: int) -> tuple[float, float, float]:
    """(compressed fraction, encode GB/s, decode GB/s) of one thread over `chunks`, best of `repeats`."""
    blosc = s.numcodecs()
    nbytes = sum(c.nbytes for c in chunks)
    out = np.empty(chunks[0].nbytes, np.uint8)
    packed, t_enc, t_dec = [], float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        packed = [blosc.encode(c) for c in chunks]
        t_enc = min(t_enc, time.perf_counter() - t0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in packed:
            blosc.decode(p, out=out)
        t_dec = min(t_dec, time.perf_counter() - t0)
    blosc.decode(packed[-1], out=out)
    assert out.tobytes() == chunks[-1].tobytes()
    return sum(len(p) for p in packed) / nbytes, nbytes / t_enc / 1e9, nbytes / t_dec / 1e9


def table(label: str, states: np.ndarray, names: list[str], repeats: int, fp32: bool) -> None:
    d = states.shape[1]
    dup = 1 - len(np.unique(float32_to_bf16_bits(states[:1 << 14]), axis=0)) / min(len(states), 1 << 14)
    print(f"\n## {label}: {len(states)} tokens x d={d}; {dup:.0%} of the rows repeat an earlier row "
          f"(e.g. the same prompt prefix; LZ compressors find those)")
    print(f"{'codec':<5} {'candidate':<24} {'fraction':>8} {'encode GB/s':>11} {'decode GB/s':>11}")
    for codec in ("bf16", "fp32") if fp32 else ("bf16",):
        c = hidden_codec(codec)
        rows = plan_layout(d, 20, c).chunk_tokens["hidden"]
        stored = float32_to_bf16_bits(states) if codec == "bf16" else states
        chunks = chunks_of(stored, min(rows, len(stored)))
        print(f"{codec}: {len(chunks)} inner chunks of {chunks[0].shape[0]} tokens ({chunks[0].nbytes / MIB:.1f} MiB); "
              f"the codec's chain today: {c.compression}")
        for name in names:
            frac, enc, dec = measure(chunks, CANDIDATES[name], repeats)
            print(f"{codec:<5} {name:<24} {frac:>8.3f} {enc:>11.2f} {dec:>11.2f}")


def cache_states(path: str, max_tokens: int) -> tuple[np.ndarray, bool]:
    """(float32 states [n, d] of a bf16/fp32 cache, whether they are float32 ones)."""
    with open_cache(path) as cache:
        codec = cache.manifest.hidden_codec
        if codec not in ("bf16", "fp32"):
            raise SystemExit(f"{path}: hidden codec {codec}; this bench needs exact states (a bf16 or fp32 cache)")
        out, n = [], 0
        for s in cache.iter_samples("ordered"):
            out.append(s.hidden)
            n += len(s.hidden)
            if n >= max_tokens:
                break
    return np.concatenate(out)[:max_tokens], codec == "fp32"


def reads(states: np.ndarray, names: list[str], repeats: int, tmp: Path) -> None:
    """Each candidate's bf16 cache of `states`, read in stored precision, beside (c) np.fromfile of raw bf16."""
    import torch

    from genrecal_cache.format.head import HeadConfig, TeacherHead
    from genrecal_cache.io.fastread import decode_pool
    from genrecal_cache.writer import CacheWriter, SampleArrays, SampleRecord

    n, d = states.shape
    bits = float32_to_bf16_bits(states)
    raw = tmp / "hidden.bf16.bin"
    bits.tofile(raw)
    rng = np.random.default_rng(0)
    vocab, L = 1000, 512
    head = TeacherHead(HeadConfig(d, vocab), torch.ones(d), torch.randn(vocab, d) * 0.02)

    def read_cache(path: Path):  # noqa: ANN202
        def run() -> None:
            got = 0
            with open_cache(path) as cache:
                for s in cache.iter_samples("ordered", precision="stored"):
                    got += s.hidden.shape[0]
            assert got == n
        return run

    rows = {}
    sizes = {}
    for name in names:
        codec = dataclasses.replace(hidden_codec("bf16"), compression=CANDIDATES[name])
        path = tmp / f"cache-{len(rows)}"
        w = CacheWriter(path, hidden_size=d, vocab_size=vocab, topk=20, hidden_codec=codec, head=head,
                        teacher=dict(id="synthetic", revision=None, config_sha256="-", model_type="synthetic"),
                        tokenizer_sha256="-", chat_template_sha256=None, command="bench/hidden_compressors.py")
        t0 = time.perf_counter()
        for i, a in enumerate(range(0, n, L)):
            m = min(L, n - a)
            w.add(SampleRecord(id=f"s{i}", messages=[{"role": "user", "content": "-"}]),
                  SampleArrays(rng.integers(0, vocab, m), np.arange(m) >= m - 32, states[a:a + m],
                               np.sort(rng.integers(0, vocab, (m, 20)), axis=1),
                               -np.sort(rng.exponential(2.0, (m, 20)), axis=1).astype(np.float32)))
        w.close()
        t_write = time.perf_counter() - t0
        with open_cache(path) as cache:  # the reader's fast path, not zarr's (see fastread.ShardedArrayReader)
            assert cache._fast_readers(cache._features()) is not None
        hid = sum(f.stat().st_size for f in (path / "features.zarr" / "hidden").rglob("*") if f.is_file())
        sizes[name] = (hid / bits.nbytes, t_write)
        rows[name] = path
    raw_t = timed(lambda: np.fromfile(raw, dtype=np.uint16), repeats)
    times = {name: timed(read_cache(path), repeats) for name, path in rows.items()}
    raw_t = min(raw_t, timed(lambda: np.fromfile(raw, dtype=np.uint16), repeats))  # (c) before and after: its best
    print(f"\n## stored-precision reads of a bf16 cache written with each candidate: {n} tokens x d={d} "
          f"({bits.nbytes / MIB:.0f} MiB of bf16), warm page cache, best of {repeats}, {decode_pool()._max_workers} "
          f"decode threads; GB/s of bf16 bytes")
    print(f"{'reader':<30} {'on disk':>8} {'write s':>7} {'GB/s':>6} {'vs (c)':>7} {'GB per CPU-s':>12}")
    print(f"{'(c) np.fromfile raw bf16 bits':<30} {1:>8.3f} {'':>7} {bits.nbytes / raw_t[0] / 1e9:>6.2f} {1:>6.2f}x "
          f"{bits.nbytes / max(raw_t[1], 1e-9) / 1e9:>12.2f}")
    for name, (secs, cpu) in times.items():
        frac, t_write = sizes[name]
        print(f"{name:<30} {frac:>8.3f} {t_write:>7.1f} {bits.nbytes / secs / 1e9:>6.2f} {raw_t[0] / secs:>6.2f}x "
              f"{bits.nbytes / max(cpu, 1e-9) / 1e9:>12.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="synthetic tokens")
    p.add_argument("--hidden-size", type=int, default=4096)
    p.add_argument("--cache", action="append", default=[], help="a bf16 or fp32 cache whose states to use too")
    p.add_argument("--max-tokens", type=int, default=65536, help="with --cache: tokens to use")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help="comma-separated names from: " + ", ".join(CANDIDATES))
    p.add_argument("--read", default="", help="comma-separated candidates whose stored-precision read to time "
                                               "(bf16 caches of the synthetic states); 'all' for every candidate")
    p.add_argument("--no-fp32", action="store_true", help="bf16 rows only")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    numcodecs.blosc.use_threads = False  # one thread per call, as on the writer thread and the decode pool
    names = [c for c in args.candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    blosc_version = numcodecs.blosc.VERSION_STRING
    blosc_version = blosc_version.decode() if isinstance(blosc_version, bytes) else blosc_version
    print(f"# bench/hidden_compressors.py on {machine()}; numcodecs {numcodecs.__version__} (blosc {blosc_version})")
    states = synthetic_post_norm_states(args.tokens, args.hidden_size, seed=0)
    table("synthetic LLM-like post-norm states (fidelity.synthetic_post_norm_states)", states, names, args.repeats,
          not args.no_fp32)
    # the default storage (lowrank context, format/roles.py) keeps only answer rows in `hidden`, zeros elsewhere:
    # here the last 15% of each 512-token sample, as bench/read_throughput.py's policies lay samples out
    answer = (np.arange(len(states)) % 512) >= 512 - int(0.15 * 512)
    table("the same, as the default storage keeps them (lowrank context: answer rows, 15%, the rest zeros)",
          np.where(answer[:, None], states, np.float32(0)), names, args.repeats, not args.no_fp32)
    for path in args.cache:
        real, is_fp32 = cache_states(path, args.max_tokens)
        table(f"{path} ({'fp32' if is_fp32 else 'bf16'} cache)", real, names, args.repeats,
              is_fp32 and not args.no_fp32)
    if args.read:
        read = names if args.read == "all" else args.read.split(",")
        with tempfile.TemporaryDirectory(prefix="genrecal-compressors-") as tmp:
            reads(states, read, args.repeats, Path(tmp))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
