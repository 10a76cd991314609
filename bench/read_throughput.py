"""Read throughput: decoded hidden-state GB/s of the streaming reader vs raw numpy and Parquet.

    python bench/read_throughput.py                       # d=4096, 65536 tokens (1 GiB of float32 states)
    python bench/read_throughput.py --tokens 131072 --codecs bf16,ecq

One set of states (synthetic LLM-like post-norm states, d=4096, samples of ~512 tokens) is stored
three ways and read back into float32 numpy arrays, side by side in one run:

- genrecal: a cache written by `CacheWriter` (bf16 default, also fp8/ecq if asked), read with
  `TeacherCache.iter_samples("ordered")`, every sample's `hidden` decoded to float32 (the other
  arrays, images and index rows come along, as in training);
- (a) raw: the same float32 bytes as one flat .bin, read with `np.fromfile` (no decoding, one
  sequential read into a fresh array, as a user would read it); (a') the same read into one
  reused buffer with `readinto` (no page faults for fresh memory either: the copy ceiling);
- (b) Parquet: what one would otherwise do: one row per token, `hidden` a fixed_size_list<float>[d]
  column (float32, pyarrow's default snappy compression, 1024-row groups), read with
  `pq.ParquetFile.iter_batches` into float32 numpy.

Then the same states stored under each context policy (`--policies`, format/roles.py: answer rows 15% of each
sample and image tokens 70%, the issue's realistic mix; bf16 answer codec, top-k at answer rows), read in
float32 and in stored precision, tokens/s side by side with `full`.

GB/s = decoded float32 hidden bytes / wall time; "GB per CPU-s" divides by the CPU time of all
the process's threads instead (what a reader costs, independent of how busy a shared machine is).
Dropping the page cache needs root, so every reader runs once to warm the cache and is then timed
(best of --repeats): these are warm-cache figures, i.e. decode + memory throughput, not disk.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from _machine import machine

from genrecal_cache.fidelity import synthetic_post_norm_states
from genrecal_cache.format.head import HeadConfig, TeacherHead
from genrecal_cache import open_cache
from genrecal_cache.writer import CacheWriter, SampleArrays, SampleRecord



def timed(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run: all threads of this process)."""
    fn()  # warm the page cache (and any lazy opening)
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--hidden-size", type=int, default=4096)
    p.add_argument("--sample-tokens", type=int, default=512)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--codecs", default="bf16,fp8,ecq")
    p.add_argument("--policies", default="full,lowrank,text,none", help="context policies to compare ('' for none)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    args = p.parse_args()
    d, n = args.hidden_size, args.tokens
    print(f"# bench/read_throughput.py on {machine()}")
    tmpdir = tempfile.TemporaryDirectory(prefix="genrecal-read-", dir=args.dir)
    tmp = Path(tmpdir.name)

    states = synthetic_post_norm_states(n, d, seed=0)
    decoded_bytes = states.nbytes
    print(f"{n} tokens x d={d}: {decoded_bytes / 2**20:.0f} MiB of float32 hidden states, samples of "
          f"{args.sample_tokens} tokens; warm page cache, best of {args.repeats}")

    raw = tmp / "hidden.f32.bin"
    states.tofile(raw)
    table = pa.table({"sample": pa.array(np.arange(n) // args.sample_tokens, pa.int32()),
                      "hidden": pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1)), d)})
    pq.write_table(table, tmp / "hidden.parquet", row_group_size=1024)
    del table

    rng = np.random.default_rng(0)
    vocab = 1000
    head = TeacherHead(HeadConfig(d, vocab), torch.ones(d), torch.randn(vocab, d) * 0.02)
    caches = {}
    for codec in args.codecs.split(","):
        path = tmp / f"cache-{codec}"
        t0 = time.perf_counter()
        w = CacheWriter(path, hidden_size=d, vocab_size=vocab, topk=args.topk, hidden_codec=codec, head=head,
                        teacher=dict(id="synthetic", revision=None, config_sha256="-", model_type="synthetic"),
                        tokenizer_sha256="-", chat_template_sha256=None, command="bench/read_throughput.py")
        for i, a in enumerate(range(0, n, args.sample_tokens)):
            L = min(args.sample_tokens, n - a)
            ids = np.sort(rng.integers(0, vocab, (L, args.topk)), axis=1)
            lps = -np.sort(rng.exponential(2.0, (L, args.topk)), axis=1).astype(np.float32)
            w.add(SampleRecord(id=f"s{i}", messages=[{"role": "user", "content": "<image> what is this?"},
                                                      {"role": "assistant", "content": "a test"}]),
                  SampleArrays(rng.integers(0, vocab, L), np.arange(L) >= L - 32, states[a:a + L], ids, lps))
        w.close()
        caches[codec] = path
        size = sum(f.stat().st_size for f in (path / "features.zarr" / "hidden").rglob("*") if f.is_file())
        print(f"wrote {codec} cache in {time.perf_counter() - t0:.1f} s: hidden {size / 2**20:.0f} MiB on disk")

    def read_raw() -> None:
        a = np.fromfile(raw, dtype=np.float32)
        assert a.size == states.size

    reused = np.empty(states.size, np.float32)

    def read_raw_reused() -> None:
        with open(raw, "rb", buffering=0) as f:
            assert f.readinto(memoryview(reused).cast("B")) == reused.nbytes

    def read_parquet() -> None:
        got = 0
        for batch in pq.ParquetFile(tmp / "hidden.parquet").iter_batches(columns=["hidden"], batch_size=4096):
            col = batch.column(0)
            h = col.values.to_numpy(zero_copy_only=False).reshape(len(col), d)
            got += h.shape[0]
        assert got == n

    def read_cache(path: Path, precision: str = "float32"):
        def run() -> None:
            got = 0
            with open_cache(path) as cache:
                for s in cache.iter_samples("ordered", precision=precision):
                    assert s.hidden.dtype == (np.uint16 if precision == "stored" else np.float32)
                    got += s.hidden.shape[0]
            assert got == n
        return run

    results = {"(a) np.fromfile raw float32": timed(read_raw, args.repeats),
               "(a') readinto a reused buffer": timed(read_raw_reused, args.repeats),
               "(b) Parquet fixed_size_list<float>": timed(read_parquet, args.repeats)}
    for codec, path in caches.items():
        results[f"genrecal TeacherCache.iter_samples, {codec}"] = timed(read_cache(path), args.repeats)
    base = results["(a) np.fromfile raw float32"][0]
    pq_s = results["(b) Parquet fixed_size_list<float>"][0]
    ceiling = results["(a') readinto a reused buffer"][0]
    print("\n" + f"{'reader':<44} {'GB/s':>7} {'vs (a) raw':>10} " + "vs (a')" + f" {'vs (b) parquet':>14} {'GB per CPU-s':>12}")
    for name, (secs, cpu) in results.items():
        print(f"{name:<44} {decoded_bytes / secs / 1e9:>7.2f} {base / secs:>9.2f}x {ceiling / secs:>6.2f}x "
              f"{pq_s / secs:>13.2f}x {decoded_bytes / max(cpu, 1e-9) / 1e9:>12.2f}")
    if "bf16" in caches:
        stored_precision(tmp, states, caches["bf16"], read_cache, results["genrecal TeacherCache.iter_samples, bf16"],
                         args.repeats)
    if args.policies:
        policies(tmp, states, head, args)
    stage_costs(states[:256], args.codecs.split(","))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    tmpdir.cleanup()


def stored_precision(tmp: Path, states: np.ndarray, cache: Path, read_cache, today: tuple[float, float],
                     repeats: int) -> None:
    """The bf16 cache read in stored precision (`iter_samples(precision="stored")`: bf16 bits, what the trainer
    moves to a GPU) side by side with today's float32 read and (c), a raw `np.fromfile` of the same
    uncompressed bf16 bytes; GB/s of bf16 bytes (half the float32 figure of the same read)."""
    from genrecal_cache.format.codecs import float32_to_bf16_bits

    raw16 = tmp / "hidden.bf16.bin"
    float32_to_bf16_bits(states).tofile(raw16)
    nbytes = states.size * 2

    def read_raw16() -> None:
        assert np.fromfile(raw16, dtype=np.uint16).size == states.size

    rows = {"(c) np.fromfile raw bf16 bits": timed(read_raw16, repeats),
            "genrecal iter_samples, bf16, precision=stored": timed(read_cache(cache, "stored"), repeats),
            "genrecal iter_samples, bf16 -> float32 (above)": today}
    base = rows["(c) np.fromfile raw bf16 bits"][0]
    print(f"\nstored precision: GB/s of bf16 bytes ({nbytes / 2**20:.0f} MiB); target: stored >= 0.8x (c)")
    print(f"{'reader':<48} {'GB/s':>7} {'vs (c)':>7} {'GB per CPU-s':>12}")
    for name, (secs, cpu) in rows.items():
        print(f"{name:<48} {nbytes / secs / 1e9:>7.2f} {base / secs:>6.2f}x {nbytes / max(cpu, 1e-9) / 1e9:>12.2f}")
    stored_steps(cache, repeats)


def stored_steps(cache: Path, repeats: int) -> None:
    """Where a stored-precision read's time goes: each step of the reader's per-chunk job (fastread.py), over every
    inner chunk of `hidden`, on one thread: the read from the page cache, the crc32c, blosc into the output, the
    finiteness check; then the whole job as the reader runs it. GB/s of bf16 output. (A chunk blosc stored as it
    is, as bf16 under lz4 without shuffle mostly is, the job reads straight into the output: no "blosc" step.)"""
    import google_crc32c

    from genrecal_cache.io.fastread import _finite, decode_pool

    with open_cache(cache) as c:
        r = c._fast_readers(c._features())["hidden"]
        out = np.empty(r.shape, r.dtype)
        c_tok, n = r.chunk_tokens, r.shape[0] // r.chunk_tokens
        if n == 0:
            print(f"(stored-read steps skipped: {r.shape[0]} tokens, less than one inner chunk of {c_tok}; "
                  f"use more --tokens)")
            return
        frames = []
        for k in range(n):
            s, j = divmod(k, r.chunks_per_shard)
            with open(r._shard_file(s), "rb") as f:
                offset, size = r._index(s, f.fileno())[j]
            frames.append((r._shard_file(s), int(offset), int(size)))
        raw = np.empty(max(size for *_, size in frames), np.uint8)
        blobs = []
        for path, offset, size in frames:
            with open(path, "rb") as f:
                f.seek(offset)
                blobs.append(np.frombuffer(f.read(size), np.uint8))

        def pread() -> None:
            for path, offset, size in frames:
                fd = os.open(path, os.O_RDONLY)
                os.preadv(fd, [raw[:size]], offset)
                os.close(fd)

        steps = {"read": pread,
                 "crc32c": lambda: [google_crc32c.value(b[:-4]) for b in blobs],
                 "blosc": lambda: [r._blosc.decode(b[:-4], out=out[k * c_tok:(k + 1) * c_tok].reshape(-1).view(np.uint8))
                                   for k, b in enumerate(blobs)],
                 "finite": lambda: [_finite(out[k * c_tok:(k + 1) * c_tok]) for k in range(n)],
                 "whole job": lambda: [r._job(k, 0, c_tok, out[k * c_tok:(k + 1) * c_tok], False)() for k in range(n)]}
        best = {k: timed(f, repeats)[0] for k, f in steps.items()}
    print(f"one thread's steps over the {n} inner chunks of `hidden` (GB/s of bf16 output; the reader runs "
          f"{decode_pool()._max_workers} such threads): " + "  ".join(f"{k} {out.nbytes / v / 1e9:.2f}" for k, v in best.items()))


def policies(tmp: Path, states: np.ndarray, head: TeacherHead, args: argparse.Namespace) -> None:
    """Each context policy's cache of the same states (bf16 answer rows), read in float32 and in stored
    precision (low-rank rows as coefficients): tokens/s, x of `full` in the same precision, tokens per CPU-s."""
    from genrecal_cache.format.roles import Storage, default_rank

    n, d, L = *states.shape, args.sample_tokens
    image_id, vocab = 7, head.vocab_size
    rng = np.random.default_rng(1)
    print(f"\ncontext policies: bf16 answer rows; per sample of {L} tokens the first {int(0.7 * L)} are image tokens and "
          f"the last {int(0.15 * L)} the answer; tokens/s, best of {args.repeats}")
    caches = {}
    for policy in args.policies.split(","):
        storage = Storage() if policy == "full" else Storage(
            context=policy, rank=default_rank(d) if policy == "lowrank" else None, topk_rows="answer",
            image_token_ids=[image_id] if policy == "text" else [])
        path = tmp / f"policy-{policy}"
        w = CacheWriter(path, hidden_size=d, vocab_size=vocab, topk=args.topk, hidden_codec="bf16", head=head,
                        teacher=dict(id="synthetic", revision=None, config_sha256="-", model_type="synthetic"),
                        tokenizer_sha256="-", chat_template_sha256=None, command="bench/read_throughput.py",
                        storage=storage)
        for i, a in enumerate(range(0, n, L)):
            m = min(L, n - a)
            ids = rng.integers(10, vocab, m)
            ids[:int(0.7 * m)] = image_id
            topk_ids = np.sort(rng.integers(0, vocab, (m, args.topk)), axis=1)
            lps = -np.sort(rng.exponential(2.0, (m, args.topk)), axis=1).astype(np.float32)
            w.add(SampleRecord(id=f"s{i}", messages=[{"role": "user", "content": "<image> what is this?"},
                                                      {"role": "assistant", "content": "a test"}]),
                  SampleArrays(ids, np.arange(m) >= m - int(0.15 * m), states[a:a + m], topk_ids, lps))
        w.close()
        caches[policy] = path

    def read(path: Path, precision: str):
        def run() -> None:
            got = 0
            with open_cache(path) as cache:
                for s in cache.iter_samples("shuffled", precision=precision):
                    got += s.hidden.shape[0]
            assert got == n
        return run

    rows = {(policy, precision): timed(read(path, precision), args.repeats)
            for precision in ("float32", "stored") for policy, path in caches.items()}
    print(f"{'policy':<8} {'MiB':>6} {'precision':<9} {'tokens/s':>10} {'x of full':>9} {'tokens per CPU-s':>16}")
    for (policy, precision), (secs, cpu) in rows.items():
        size = sum(f.stat().st_size for f in (caches[policy] / "features.zarr").rglob("*") if f.is_file())
        full = rows.get(("full", precision), (secs, cpu))[0]
        print(f"{policy:<8} {size / 2**20:>6.0f} {precision:<9} {n / secs:>10,.0f} {full / secs:>8.2f}x {n / max(cpu, 1e-9):>16,.0f}")


def stage_costs(x: np.ndarray, codecs: list[str], repeats: int = 20) -> None:
    """Per-thread cost of each step of reading one inner chunk (as `fastread` does it), in GB/s of
    float32 output: blosc decompression into a reused buffer, then the codec's decode into the output."""
    from genrecal_cache.format.codecs import decode_payload, hidden_codec
    from genrecal_cache.io.fastread import bf16_into

    print(f"\none inner chunk of {x.shape[0]} tokens, one thread, best of {repeats}: GB/s of float32 output")
    out = np.empty_like(x)
    for name in codecs:
        codec = hidden_codec(name)
        # bf16/fp32: blosc shuffles by the stored dtype's item size, taken from the array it encodes
        payload = codec.quantizer.encode_array(x) if codec.quantizer else codec.to_stored(x)
        blosc = codec.compression.numcodecs()  # the cache's settings
        packed, buf = blosc.encode(payload), np.empty(payload.nbytes, np.uint8)
        if codec.quantizer is not None:
            decode = lambda: decode_payload(buf, out=out)  # noqa: E731
        elif name == "bf16":
            decode = lambda: bf16_into(out, buf.view(np.uint16).reshape(x.shape))  # noqa: E731
        else:
            decode = lambda: np.copyto(out, buf.view(np.float32).reshape(x.shape))  # noqa: E731
        steps = {"blosc": lambda: blosc.decode(packed, out=buf), "decode": decode}
        best = {k: float("inf") for k in steps}
        for _ in range(repeats):
            for k, f in steps.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
        assert np.array_equal(out, codec.round_trip(x), equal_nan=True)
        both = x.nbytes / sum(best.values()) / 1e9
        print(f"  {name:<5} blosc {x.nbytes / best['blosc'] / 1e9:5.2f}  decode {x.nbytes / best['decode'] / 1e9:5.2f}  "
              f"both {both:5.2f}  (compressed to {len(packed) / payload.nbytes:.3f} of the payload)")


if __name__ == "__main__":
    main()
