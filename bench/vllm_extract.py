"""vLLM extraction throughput: `extract(backend="vllm")` vs bare `llm.encode`, same engine, same inputs.

    python bench/vllm_extract.py                      # tiny random Qwen2-VL + 400 demo samples (CPU ok)
    python bench/vllm_extract.py --teacher /models/Qwen2-VL-72B-Instruct --data train.jsonl \
        --engine '{"tensor_parallel_size": 8}' --limit 2000

The engine is started once (inside `extract`). Extraction is timed from "engine ready" to "cache
written" (encode + top-k + writer), then the same engine runs `llm.encode` over the same prompts
and images in one call. Engine start is reported separately and excluded from both rates.
On a CPU without torchvision run it with the compat shim: PYTHONPATH=genrecal_cache/compat.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="teacher folder (default: build the tiny test teacher)")
    p.add_argument("--data", help="JSONL/Parquet (default: synthetic demo questions)")
    p.add_argument("--n", type=int, default=400, help="demo samples when --data is not given")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--hidden-dtype", default="bfloat16")
    p.add_argument("--engine", default="{}", help="JSON dict of VLLMBackend/engine kwargs")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="genrecal-bench-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    import genrecal_cache.backends.vllm as vb
    from genrecal_cache.data import decode_image, read_samples
    from genrecal_cache.extract import ExtractConfig, extract
    from genrecal_cache.families import adapter_for

    teacher = args.teacher
    if teacher is None:
        from genrecal_cache.testing import build_tiny_teacher

        teacher = str(build_tiny_teacher(tmp / "teacher"))
    data = args.data
    if data is None:
        from genrecal_cache.demo_data import write_demo_dataset

        data = str(write_demo_dataset(tmp / "demo", n=args.n, seed=0))

    # The same inputs for the bare run: what the extract loop hands the backend.
    adapter = adapter_for(teacher)
    processor = adapter.load_processor(teacher)
    encoded = []
    for s in read_samples(data, limit=args.limit):
        if not s.error:
            images = [decode_image(b) for b in s.images]
            encoded.append(adapter.encode(processor, s, images, args.max_len))
    tokens = sum(len(e.input_ids) for e in encoded)

    marks: dict[str, float] = {}
    kept: list[vb.VLLMBackend] = []

    class Timed(vb.VLLMBackend):
        """Marks engine-ready and extraction-done; keeps the engine for the bare run."""

        def __init__(self, *a, **kw):
            marks["start"] = time.perf_counter()
            super().__init__(*a, **kw)
            self.check_head(encoded[:8])  # its generate engine, then the pooling engine + warm-up: outside both timings
            marks["ready"] = time.perf_counter()

        def close(self) -> None:
            marks["done"] = time.perf_counter()
            kept.append(self)

    vb.VLLMBackend = Timed
    cfg = ExtractConfig(teacher=teacher, data=data, out=str(tmp / "cache"), backend="vllm", topk=args.topk,
                        max_len=args.max_len, batch_tokens=args.batch_tokens, limit=args.limit,
                        hidden_codec=args.hidden_dtype, dtype=args.dtype, progress=False,
                        vllm=json.loads(args.engine))
    manifest = extract(cfg)
    backend = kept[0]
    try:
        assert manifest.counts["tokens"] == tokens, (manifest.counts, tokens)
        t0 = time.perf_counter()
        outs = backend.encode(encoded)  # bare: one llm.encode call, no checks, no top-k, no writing
        bare_s = time.perf_counter() - t0
        assert sum(o.outputs.data.shape[0] for o in outs) == tokens
    finally:
        vb.VLLMBackend.close(backend)

    extract_s = marks["done"] - marks["ready"]
    print(f"teacher {teacher}\n{len(encoded)} samples, {tokens} tokens, topk {args.topk}, "
          f"batch_tokens {args.batch_tokens}, engine {args.engine}")
    print(f"engine starts (head check's generate engine, pooling engine, 8-sample warm-up): "
          f"{marks['ready'] - marks['start']:.1f} s")
    print(f"extract (encode + top-k + write): {tokens / extract_s:10.0f} tokens/s  ({extract_s:.2f} s)")
    print(f"bare llm.encode, one call:        {tokens / bare_s:10.0f} tokens/s  ({bare_s:.2f} s, "
          f"{1000 * bare_s / len(encoded):.1f} ms/request)")
    print(f"ratio extract / bare: {bare_s / extract_s:.2f}")


if __name__ == "__main__":  # vLLM starts worker processes: keep the guard
    main()
