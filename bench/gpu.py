"""Prove a GPU node in one command: kernels, ring, bf16 training, speed, memory, a real stage.

    python -m bench.gpu [--out DIR] [--results bench/RESULTS.md]      # from the repo root

Sections, each in its own process (a sticky CUDA error or a crash in one cannot take the
others down; ``--no-isolate`` runs them in this process), each printing its numbers as
it goes; a failing section prints its error and the next one runs. Exit 0 when every
section passed (or was skipped, saying why), 1 otherwise, 2 without a CUDA device.

1. ``kernels``: longtrain's attention kernel interface (``attention``,
   ``document_attention``; the dispatch pinned to one backend at a time) against float64
   math on the same inputs, forward (out, lse) and backward (dq, dk, dv): torch's flash
   kernel (bf16), torch's memory-efficient kernel (bf16, fp32), flash-attn (bf16) when
   importable; causal, causal within documents, and the ring's rectangular unmasked
   block; head_dim 64 (model=125m) and 128. Tolerance, per tensor, flash-attn's own test
   rule: the kernel's largest error against float64 at most twice that of the same math
   done plainly in the kernel's dtype (scores in the dtype, softmax in fp32, probabilities
   cast back: flash-attn's reference with upcast=False) plus a floor: for bf16 one
   rounding step at the largest value (eps·max|ref|); for fp32 1e-5·max|ref| (the
   design's fp32 ring tolerance; a kernel that ran in TF32, ~1e-3, fails it).
2. ``ring``: ring attention over NCCL at cp = 2 … GPUs against one rank's kernel, forward
   and backward, bf16 and fp32, with and without documents. Tolerances: fp32 1e-5·max|ref|
   (the design's invariant), bf16 8e-3·cp·max(1, max|ref|) (PyTorch's CP tests' atol
   8e-3·cp). With one GPU it is skipped: NCCL cannot put two ranks on one device.
3. ``bf16_vs_fp32``: ``--train-steps`` (50) steps of model=125m at 8K tokens under bf16
   autocast (as the trainer runs CUDA) and in fp32, from the same initial weights on the
   same tokens (the stdlib corpus in longtrain's document order, byte tokenizer, one
   8K window per step); AdamW and the WSD schedule as longtrain builds them (warm-up 10%).
   Pass: the first step's loss (same weights: forward precision only) within 1% and the
   mean of the last 10 losses within 2% (relative). bf16 rounds matmul inputs to 8 bits
   (~0.4%); trajectories separate over 50 AdamW steps but the loss level tracks, while a
   broken bf16 path (no learning, a wrong kernel) misses by far more (ln 259 = 5.6 nats
   at init against ~2-3 after 50 steps).
4. ``throughput``: tokens/s and MFU of the training step (forward, backward, clipping,
   AdamW, schedule; bf16 autocast) of model=125m at 8K and 32K (and 32K with selective
   checkpointing): median of ``--timed-steps`` steps after ``--warmup-steps``, each timed
   between ``torch.cuda.synchronize`` calls. FLOPs per token as the trainer's MFU counts
   them (``flops_per_token``: 6N + 6·layers·heads·head_dim·seq, no causal discount, no
   recompute), over the dense bf16 peak of ``longtrain.hardware`` (989 TFLOP/s for H100/H200 SXM).
5. ``memory``: the same configurations, one step after a warm-up step (the AdamW state
   exists): ``torch.cuda.max_memory_allocated`` against the planner's live peak
   (``plan_stage(...).live_peak``; goal ±15%, the planner's CPU goal), and the reserved
   peak plus the process's CUDA context against its whole prediction (context and
   allocator reserve are assumptions there: reported, not judged).
6. ``extend_32k``: ``train.py stage=extend_32k`` (the configs composed by Hydra as for
   any run) for ``--extend-steps`` steps of 2 × 32K tokens at the largest cp the node has
   (torchrun with cp ranks when there are several GPUs), the gate shrunk to one needle
   and its threshold to 0, in a temporary run folder. Pass: exit 0, every logged loss
   finite, and the mean of the last third below the first.

``--out DIR`` writes ``gpu.json`` (every number), ``gpu.md`` (the RESULTS.md section) and
``gpu.log``; ``--results FILE`` puts the section into FILE (replacing that device's
earlier one); ``--splice DIR/gpu.md --results bench/RESULTS.md`` does that later, on
another machine. ``--device cpu --tiny`` runs every section at toy sizes on the CPU (the
ring over gloo at cp=2): what tests/test_bench_gpu.py does, so the logic runs before a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# --- longtrain: every import of the package, in one place (the restructuring into
# trainer/ and preflight.py may move some of these; adapt them here).
from longtrain.attention import documents as lt_documents
from longtrain.attention import kernels as lt_kernels
from longtrain.attention.documents import document_attention
from longtrain.attention.kernels import FLASH_ATTN_VERSION, attention
from longtrain.attention.ring import ring_attention
from longtrain.config import Config, DataConfig
from longtrain.data.sources import documents as corpus_documents
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.hardware import autocast_dtype, peak_bf16_tflops
from longtrain.model.transformer import Transformer
from longtrain.optim.loss import total_loss
from longtrain.optim.optimizer import build_optimizer
from longtrain.optim.schedule import build_wsd_scheduler
from longtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from longtrain.parallel.sharding import zigzag_shard
from longtrain.plan import compose as compose_stages
from longtrain.plan import plan_stage
from longtrain.trainer.meter import flops_per_token

REPO = Path(__file__).resolve().parents[1]
VOCAB = ByteTokenizer.vocab_size
NO_CUDA_EXIT = 2  # train.py's "bad input" code: this machine cannot run what was asked
GiB = 1024**3


# ------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    """Everything that scales: the real run (``FULL``) and a toy one for CPU tests (``TINY``)."""

    model: str  # configs/model option
    attention: tuple[int, int, int, int]  # kernel parity (B, Hq, Hkv, T): 125m's GQA 12/4
    head_dims: tuple[int, ...]
    ring_len: int  # divisible by 2·cp for every cp run (FULL: 1680, cp 2 to 8)
    train_len: int
    speed_rows: tuple[tuple[int, str], ...]  # (seq_len, model.activation_checkpointing)
    extend_len: int
    extend_overrides: tuple[str, ...]  # extra train.py overrides of the toy run


FULL = Sizes("125m", (2, 12, 4, 2048), (64, 128), 1680, 8192,
             ((8192, "none"), (32768, "none"), (32768, "selective")), 32768, ())
TINY = Sizes("tiny", (2, 4, 2, 96), (16,), 48, 128, ((128, "none"), (256, "none"), (256, "selective")), 512,
             ("model=tiny", "stage.seq_len=512", "rope.original_max_position_embeddings=256", "gate.short_val_samples=2"))


@dataclass
class Options:
    device: torch.device
    sizes: Sizes
    train_steps: int = 50
    warmup_steps: int = 3
    timed_steps: int = 10
    extend_steps: int = 8
    timeout_s: float = 300.0


# ------------------------------------------------------------------ results and log
_T0_ENV = "BENCH_GPU_T0"  # the parent's start, so a section's process counts from it too
_T0 = float(os.environ.get(_T0_ENV, time.time()))
_LOG_FILE: Optional[Path] = None


def log(message: str) -> None:
    """A timestamped, flushed line on stdout (and in --out DIR/gpu.log)."""
    line = f"[{time.strftime('%H:%M:%S')} +{time.time() - _T0:6.1f}s] {message}"
    print(line, flush=True)
    if _LOG_FILE is not None:
        with _LOG_FILE.open("a") as f:
            f.write(line + "\n")


@dataclass
class Section:
    """One section's outcome: a table (display strings), every number (JSON), notes."""

    name: str
    title: str
    status: str = "pass"  # pass | fail | error | skipped
    rows: list[dict] = field(default_factory=list)
    numbers: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    def add(self, row: dict, numbers: Optional[dict] = None, ok: Optional[bool] = None) -> None:
        """A table row; ``ok`` None: informational, False fails the section."""
        row = {**row, "pass": "-" if ok is None else ("yes" if ok else "**NO**")}
        self.rows.append(row)
        self.numbers.append({**{k: v for k, v in row.items() if k != "pass"}, **(numbers or {}), "ok": ok})
        if ok is False and self.status == "pass":
            self.status = "fail"
        log(f"  {'  '.join(f'{k} {v}' for k, v in row.items())}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"  {text}")


def _e(x: float) -> str:
    return f"{x:.2e}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------ devices
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_process(cmd: list[str], timeout_s: float, capture: bool = False) -> tuple[Optional[int], str]:
    """(exit code, output if captured) of ``cmd`` run from the repo root in a process group
    of its own: past ``timeout_s`` the whole group is killed (torchrun's or a section's
    ranks with it, so none is left holding a GPU) and the code is None."""
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", _T0_ENV: str(_T0)},
                            stdout=pipe, stderr=subprocess.STDOUT if capture else None, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, output or ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output or ""


def no_cuda_reason() -> Optional[str]:
    """Why this process cannot use CUDA, in a few words; None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    if not torch.cuda.is_available():
        return (f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda}: "
                "no driver or no visible GPU)")
    return None


def describe_device(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "flash_attn": FLASH_ATTN_VERSION,
            "python": sys.version.split()[0]}
    if device.type != "cuda":
        return {"name": "CPU", **info}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "gpus": torch.cuda.device_count(), "capability": f"sm{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / GiB, 1), "multiprocessors": props.multi_processor_count, **info}


# ------------------------------------------------------------------ 1. kernel parity
MASKS = ("causal", "documents", "rectangular")  # rectangular: the ring's unmasked q-half × whole block
# Tolerance floor relative to max|ref|, by the dtype a tensor is stored in (lse: always fp32):
# half a bf16 unit in the last place (a bf16 result cannot be closer); 1e-5 for fp32.
_FLOOR = {torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps / 2}


def kernel_cases(device: torch.device) -> list[tuple[str, torch.dtype]]:
    """(backend, dtype) pairs to check: what longtrain's dispatch can pick on this device."""
    if device.type != "cuda":
        return [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    cases = [("sdpa_flash", torch.bfloat16), ("efficient", torch.bfloat16), ("efficient", torch.float32)]
    return ([("flash_attn", torch.bfloat16)] if FLASH_ATTN_VERSION else []) + cases


@contextlib.contextmanager
def pinned_backend(backend: str) -> Iterator[None]:
    """longtrain's kernel dispatch held to ``backend``: kernel_forward/backward (and so every
    document rectangle) ask ``kernels.kernel_backend``; documents take flash-attn's varlen
    path only for backend flash_attn."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(lt_kernels, "kernel_backend", lambda *a, **k: backend))
        if backend != "flash_attn":
            stack.enter_context(mock.patch.object(lt_documents, "_uses_varlen", lambda q: False))
        yield


def random_doc_ids(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] nondecreasing doc ids: 2-12 documents per row of random lengths, row 0 starting
    with a one-token document."""
    rows = []
    for b in range(batch):
        n = int(torch.randint(1, 12, (), generator=gen))
        cuts = torch.randperm(seq - 1, generator=gen)[:n] + 1
        starts = torch.zeros(seq, dtype=torch.int64)
        starts[cuts] = 1
        if b == 0:
            starts[1] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def attention_mask(tq: int, s: int, causal: bool, doc_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Boolean mask of the live (query, key) pairs, broadcastable to [B, H, Tq, S]; None: all live."""
    mask = torch.ones(tq, s, dtype=torch.bool).tril()[None, None] if causal else None
    if doc_ids is not None:  # documents come with causal, square blocks
        same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        mask = same if mask is None else same & mask.to(same.device)
    return mask


def math_attention(q, k, v, causal: bool, doc_ids: Optional[torch.Tensor], scale: float):
    """Plain softmax attention: scores and P·V in q's dtype, the softmax in fp32 (fp64 for
    fp64): flash-attn's test reference with upcast=False. (out, lse)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)).to(acc) * scale
    mask = attention_mask(q.shape[2], k.shape[2], causal, doc_ids)
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse[..., None]).to(q.dtype) @ v, lse


def _run_attention(fn: Callable, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, dout: torch.Tensor) -> dict:
    """out, lse and the gradients of one attention function on ``inputs`` cast to ``dtype``,
    all as float64."""
    q, k, v = (x.detach().to(dtype, copy=True).requires_grad_() for x in inputs)
    out, lse = fn(q, k, v)
    out.backward(dout.to(dtype))
    return {name: t.detach().double() for name, t in
            (("out", out), ("lse", lse), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}


def _parity_inputs(sizes: Sizes, head_dim: int, mask: str, dtype: torch.dtype, device: torch.device, seed: int):
    """Fresh random q, k, v, dout on ``device``, fp64 holding values exact in ``dtype`` (so
    every side sees the same inputs, and the errors are the kernels' own, as in flash-attn's
    tests), and doc ids (or None)."""
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, t = sizes.attention
    tq = t // 2 if mask == "rectangular" else t
    q, dout = (torch.randn(b, hq, tq, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, hkv, t, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    docs = random_doc_ids(b, t, gen).to(device) if mask == "documents" else None
    q, k, v, dout = (x.to(device, dtype).double() for x in (q, k, v, dout))
    return (q, k, v), dout, docs


def parity_case(backend: str, dtype: torch.dtype, head_dim: int, mask: str, opts: Options, seed: int) -> dict:
    """{tensor: (kernel error, tolerance, max|ref|)} for one case (see the module doc)."""
    inputs, dout, docs = _parity_inputs(opts.sizes, head_dim, mask, dtype, opts.device, seed)
    scale = head_dim**-0.5
    causal = mask != "rectangular"

    def kernel(q, k, v):
        if docs is not None:
            return document_attention(q, k, v, docs, scale)
        return attention(q, k, v, causal=causal, scale=scale)

    def plain(q, k, v):
        return math_attention(q, k, v, causal, docs, scale)

    with pinned_backend(backend):
        got = _run_attention(kernel, inputs, dtype, dout)
    ref = _run_attention(plain, inputs, torch.float64, dout)
    low = _run_attention(plain, inputs, dtype, dout)
    result = {}
    for name, want in ref.items():
        scale_ref = want.abs().max().item()
        err = (got[name] - want).abs().max().item() if torch.isfinite(got[name]).all() else math.inf
        floor = _FLOOR[torch.float32 if name == "lse" else dtype]
        tol = 2 * (low[name] - want).abs().max().item() + floor * scale_ref
        result[name] = (err, tol, scale_ref)
    return result


def section_kernels(opts: Options, sec: Section) -> None:
    b, hq, hkv, t = opts.sizes.attention
    sec.note(f"q [{b}, {hq}, T, D], k/v [{b}, {hkv}, {t}, D]; T = {t} ({t // 2} for rectangular); "
             "backends: " + ", ".join(f"{k} {dtype_name(d)}" for k, d in kernel_cases(opts.device))
             + ("" if FLASH_ATTN_VERSION or opts.device.type != "cuda" else "; flash-attn not importable: not checked"))
    seed = 0
    for backend, dtype in kernel_cases(opts.device):
        for head_dim in opts.sizes.head_dims:
            for mask in MASKS:
                seed += 1
                result = parity_case(backend, dtype, head_dim, mask, opts, seed)
                worst = max(err / tol for err, tol, _ in result.values())
                row = {"backend": backend, "dtype": dtype_name(dtype), "D": head_dim, "mask": mask}
                row.update({name: f"{_e(err)} / {_e(tol)}" for name, (err, tol, _) in result.items()})
                row["worst err/tol"] = f"{worst:.2f}"
                numbers = {f"{name}_{key}": value for name, triple in result.items()
                           for key, value in zip(("err", "tol", "max_ref"), triple)}
                sec.add(row, numbers, ok=worst <= 1.0)
    sec.note("cells: max |kernel − fp64| / tolerance (2 × the plain same-dtype math's error + floor)")


# ------------------------------------------------------------------ 2. ring over NCCL
RING_DTYPES = (torch.float32, torch.bfloat16)


def ring_tolerance(dtype: torch.dtype, cp: int, scale_ref: float) -> float:
    return 1e-5 * scale_ref if dtype == torch.float32 else 8e-3 * cp * max(1.0, scale_ref)


def _ring_errors(rank: int, cp: int, group, dtype: torch.dtype, docs: bool, sizes: Sizes,
                 device: torch.device, seed: int) -> list[float]:
    """[err, max|ref|] for out, dq, dk, dv of this rank's ring shard vs one rank's kernel."""
    gen = torch.Generator().manual_seed(seed)  # the same whole sequence on every rank
    b, hq, hkv, _ = sizes.attention
    t, d = sizes.ring_len, sizes.head_dims[0]
    q, dout = (torch.randn(b, hq, t, d, generator=gen).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, t, d, generator=gen).to(device, dtype) for _ in range(2))
    doc_ids = random_doc_ids(b, t, gen).to(device) if docs else None
    scale = d**-0.5
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = document_attention(*full, doc_ids, scale)[0] if docs else attention(*full, causal=True, scale=scale)[0]
    ref.backward(dout)
    local = [zigzag_shard(x, rank, cp, dim=2).requires_grad_() for x in (q, k, v)]
    local_docs = None if doc_ids is None else zigzag_shard(doc_ids, rank, cp, dim=1)
    out = ring_attention(*local, scale, group, local_docs)
    out.backward(zigzag_shard(dout, rank, cp, dim=2))
    errors = []
    for got, want in [(out, ref)] + [(x.grad, y.grad) for x, y in zip(local, full)]:
        want = zigzag_shard(want.detach(), rank, cp, dim=2).double()
        errors += [(got.detach().double() - want).abs().max().item(), want.abs().max().item()]
    return errors


def _ring_worker(rank: int, world: int, backend: str, init_file: str, result_file: str, sizes: Sizes) -> None:
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows, seed = [], 0
    try:
        for cp in range(2, world + 1):
            group = dist.new_group(list(range(cp)))  # collective: every rank builds every group
            for dtype in RING_DTYPES:
                for docs in (False, True):
                    seed += 1
                    errs = _ring_errors(rank, cp, group, dtype, docs, sizes, device, seed) if rank < cp else [0.0] * 8
                    worst = torch.tensor(errs, dtype=torch.float64, device=device)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                    rows.append({"cp": cp, "dtype": dtype_name(dtype), "documents": docs,
                                 "errors": worst.tolist()})
    finally:
        if rank == 0:
            Path(result_file).write_text(json.dumps(rows))
        dist.destroy_process_group()


def run_ring(world: int, backend: str, sizes: Sizes, timeout_s: float) -> list[dict]:
    """Spawn ``world`` ranks and return rank 0's rows; ranks still running after
    ``timeout_s`` (a hung P2P exchange) are killed and TimeoutError raised."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "rows.json")
        ctx = mp.start_processes(_ring_worker, args=(world, backend, init_file, result_file, sizes),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"ring ranks did not finish within {timeout_s:.0f}s (a hung exchange?)")
        return json.loads(Path(result_file).read_text())


def section_ring(opts: Options, sec: Section) -> None:
    if opts.device.type == "cuda":
        world, backend = torch.cuda.device_count(), "nccl"
        if world < 2:
            sec.status = "skipped"
            sec.note(f"ring attention over NCCL skipped: {world} GPU on this node, and NCCL cannot put two ranks "
                     "on one device (it refuses duplicate GPUs in a communicator); needs ≥ 2 GPUs")
            return
    else:
        world, backend = 2, "gloo"  # the CPU run of this section: the same code over gloo
    sec.note(f"{backend}, cp = 2 … {world}, T = {opts.sizes.ring_len}, head_dim {opts.sizes.head_dims[0]}; "
             "errors: max over ranks of max |ring − one rank|")
    for row in run_ring(world, backend, opts.sizes, opts.timeout_s):
        errs = row["errors"]
        dtype = getattr(torch, row["dtype"])
        checks = [(name, errs[2 * i], ring_tolerance(dtype, row["cp"], errs[2 * i + 1]))
                  for i, name in enumerate(("out", "dq", "dk", "dv"))]
        display = {"cp": row["cp"], "dtype": row["dtype"], "documents": "yes" if row["documents"] else "no"}
        display.update({name: f"{_e(err)} / {_e(tol)}" for name, err, tol in checks})
        numbers = {f"{name}_{k}": v for name, err, tol in checks for k, v in (("err", err), ("tol", tol))}
        sec.add(display, numbers, ok=all(err <= tol for _, err, tol in checks))


# ------------------------------------------------------------------ training runs (3-6)
def stage_config(opts: Options, seq_len: int, checkpointing: str, steps: int = 100, warmup: int = 0) -> Config:
    """The validated config train.py would run for stage=pretrain of ``--sizes``'s model,
    one sequence of ``seq_len`` per step, composed from configs/ by Hydra."""
    overrides = [
        "stage=pretrain", f"model={opts.sizes.model}", f"stage.seq_len={seq_len}", "stage.micro_batch_size=1",
        "stage.global_batch_size=1", f"stage.steps={steps}", f"stage.warmup_steps={warmup}",
        f"model.activation_checkpointing={checkpointing}", f"run.device={opts.device.type}",
    ]
    return compose_stages(overrides)[0]


def corpus_tokens(n: int) -> torch.Tensor:
    """The first ``n`` tokens of the stdlib corpus in longtrain's (seeded) document order,
    byte tokenizer, each document between BOS and EOS."""
    tok, parts, total = ByteTokenizer(), [], 0
    _, docs = corpus_documents(DataConfig(), Counter())
    for _, _, text in docs:
        ids = np.concatenate(([tok.bos_id], np.frombuffer(text.encode("utf-8"), dtype=np.uint8), [tok.eos_id]))
        parts.append(ids.astype(np.int64))
        total += len(ids)
        if total >= n:
            break
    return torch.from_numpy(np.concatenate(parts)[:n])


def corpus_batches(steps: int, seq_len: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """One [1, seq_len] window per step, consecutive, labels shifted by one, on ``device``."""
    tokens = corpus_tokens(steps * seq_len + 1)
    positions = torch.arange(seq_len)[None].to(device)
    return [{"input_ids": tokens[i * seq_len:(i + 1) * seq_len][None].to(device),
             "labels": tokens[i * seq_len + 1:(i + 1) * seq_len + 1][None].to(device),
             "position_ids": positions} for i in range(steps)]


@dataclass
class Run:
    """A model with its optimizer and schedule, built as the trainer builds them at dp=cp=1."""

    cfg: Config
    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Optional[torch.dtype]


def build_run(cfg: Config, device: torch.device, autocast: Optional[torch.dtype]) -> Run:
    torch.manual_seed(cfg.run.seed)  # as Trainer.__init__: the same seed, the same initial weights
    model = Transformer(cfg.model, cfg.rope, cfg.model.vocab_size or VOCAB).to(device)
    # What parallelize does on one rank without compile: the blocks checkpointed as configured.
    apply_activation_checkpointing(model.layers, cfg.model.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.optim)
    s = cfg.stage
    scheduler = build_wsd_scheduler(optimizer, s.steps, s.warmup_steps, s.decay_fraction, s.decay_shape, s.final_lr_ratio)
    return Run(cfg, model, optimizer, scheduler, autocast)


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimizer step as ``Trainer.train_step`` takes it with one micro-batch on one rank:
    the forward under the run's autocast, the mean loss over the step's tokens, clipping,
    AdamW, the schedule. Returns the step's mean CE (a device tensor: reading it syncs)."""
    o = run.cfg.optim
    context = torch.autocast(batch["input_ids"].device.type, dtype=run.autocast) if run.autocast else contextlib.nullcontext()
    with context:
        sums = run.model(batch["input_ids"], batch["position_ids"], batch["labels"], o.loss_chunk_size, z_loss=o.z_loss)
    total_loss(sums, sums.tokens).backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), o.grad_clip or float("inf"), foreach=True)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return (sums.ce / sums.tokens).detach()


def release(device: torch.device) -> None:
    """Free what the last run left in the caching allocator, so the next one starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_autocast(opts: Options, cfg: Config) -> Optional[torch.dtype]:
    return autocast_dtype(cfg.run.dtype, opts.device.type)  # bf16 on CUDA (run.dtype auto), none on the CPU


# ------------------------------------------------------------------ 3. bf16 vs fp32
def train_losses(cfg: Config, opts: Options, autocast: Optional[torch.dtype], batches: list[dict]) -> list[float]:
    run = build_run(cfg, opts.device, autocast)
    losses = [train_step(run, batch) for batch in batches]
    result = [x.item() for x in losses]
    del run
    release(opts.device)
    return result


def section_bf16_vs_fp32(opts: Options, sec: Section) -> None:
    steps, seq = opts.train_steps, opts.sizes.train_len
    cfg = stage_config(opts, seq, "none", steps=steps, warmup=max(1, steps // 10))
    batches = corpus_batches(steps, seq, opts.device)
    sec.note(f"model={opts.sizes.model}, {steps} steps × {seq} tokens of the stdlib corpus (byte tokenizer), "
             f"lr {cfg.optim.lr:g}, warm-up {cfg.stage.warmup_steps}, WSD; same initial weights and tokens")
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        started = time.monotonic()
        losses[name] = train_losses(cfg, opts, dtype, batches)
        log(f"  {name}: {steps} steps in {time.monotonic() - started:.1f} s, loss {losses[name][0]:.4f} → {losses[name][-1]:.4f}")
    last = min(10, steps)
    for what, pick, tolerance in (("step 1", lambda xs: xs[0], 0.01),
                                  (f"mean of the last {last}", lambda xs: statistics.fmean(xs[-last:]), 0.02)):
        fp32, bf16 = pick(losses["fp32"]), pick(losses["bf16"])
        rel = abs(bf16 - fp32) / abs(fp32)
        finite = all(map(math.isfinite, losses["fp32"] + losses["bf16"]))
        sec.add({"loss": what, "fp32": f"{fp32:.4f}", "bf16": f"{bf16:.4f}", "relative difference": f"{rel:.2%}",
                 "tolerance": f"{tolerance:.0%}"}, {"fp32_value": fp32, "bf16_value": bf16, "rel": rel},
                ok=finite and rel <= tolerance)
    sec.numbers.append({"losses_fp32": losses["fp32"], "losses_bf16": losses["bf16"]})
    every = max(1, steps // 5)
    sec.note("losses fp32 / bf16 at steps " + ", ".join(
        f"{i + 1}: {losses['fp32'][i]:.3f} / {losses['bf16'][i]:.3f}" for i in range(0, steps, every)))


# ------------------------------------------------------------------ 4. throughput and MFU
def timed_steps(run: Run, batch: dict, warmup: int, timed: int, device: torch.device) -> list[float]:
    """Seconds of each of ``timed`` steps after ``warmup`` untimed ones, each between syncs."""
    for _ in range(warmup):
        train_step(run, batch)
    times = []
    for _ in range(timed):
        synchronize(device)
        start = time.perf_counter()
        train_step(run, batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def section_throughput(opts: Options, sec: Section) -> None:
    peak = peak_bf16_tflops(torch.cuda.get_device_name(opts.device)) if opts.device.type == "cuda" else None
    sec.note(f"model={opts.sizes.model}, batch 1, median of {opts.timed_steps} steps after {opts.warmup_steps}; "
             f"MFU over {peak or '-'} TFLOP/s dense bf16 (longtrain.hardware), FLOPs/token as the trainer counts them")
    for seq, checkpointing in opts.sizes.speed_rows:
        cfg = stage_config(opts, seq, checkpointing)
        run = build_run(cfg, opts.device, run_autocast(opts, cfg))
        batch = corpus_batches(1, seq, opts.device)[0]
        times = timed_steps(run, batch, opts.warmup_steps, opts.timed_steps, opts.device)
        median = statistics.median(times)
        per_token = flops_per_token(cfg, run.model.num_params(exclude_embedding=True))
        tflops = seq / median * per_token / 1e12
        sec.add({"seq": seq, "checkpointing": checkpointing, "step s (median)": f"{median:.3f}",
                 "min-max s": f"{min(times):.3f}-{max(times):.3f}", "tokens/s": f"{seq / median:,.0f}",
                 "TFLOP/s": f"{tflops:.1f}", "MFU": f"{tflops / peak:.1%}" if peak else "-"},
                {"times": times, "flops_per_token": per_token, "tokens_per_s": seq / median,
                 "mfu": tflops / peak if peak else None})
        del run
        release(opts.device)


# ------------------------------------------------------------------ 5. memory vs the planner
def _context_bytes(device: torch.device) -> Optional[int]:
    """Device memory this process uses outside PyTorch's allocator (context, cuBLAS, ...),
    assuming no other process on the GPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def section_memory(opts: Options, sec: Section) -> None:
    sec.note("measured: max_memory_allocated over one step after a warm-up step (AdamW state allocated); "
             "planned: plan_stage(...).live_peak; whole: reserved peak + CUDA context vs the planner's peak")
    for seq, checkpointing in opts.sizes.speed_rows:
        cfg = stage_config(opts, seq, checkpointing)
        plan = plan_stage(cfg, cfg.model.vocab_size or VOCAB, opts.device.type)
        run = build_run(cfg, opts.device, run_autocast(opts, cfg))
        batch = corpus_batches(1, seq, opts.device)[0]
        train_step(run, batch)
        synchronize(opts.device)
        measured = reserved = None
        if opts.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(opts.device)
            train_step(run, batch)
            synchronize(opts.device)
            measured = torch.cuda.max_memory_allocated(opts.device)
            reserved = torch.cuda.max_memory_reserved(opts.device) + _context_bytes(opts.device)
        ratio = plan.live_peak / measured if measured else None
        sec.add({"seq": seq, "checkpointing": checkpointing, "planned live GiB": f"{plan.live_peak / GiB:.2f}",
                 "measured GiB": f"{measured / GiB:.2f}" if measured else "-",
                 "planned / measured": f"{ratio:.3f}" if ratio else "-",
                 "planned whole GiB": f"{plan.peak / GiB:.2f}",
                 "reserved + context GiB": f"{reserved / GiB:.2f}" if reserved else "-"},
                {"planned_live": plan.live_peak, "measured": measured, "planned_peak": plan.peak,
                 "reserved_plus_context": reserved, "ratio": ratio},
                ok=None if ratio is None else 0.85 <= ratio <= 1.15)
        del run
        release(opts.device)


# ------------------------------------------------------------------ 6. extend_32k through train.py
def largest_cp(seq_len: int, gpus: int) -> int:
    """The largest cp ≤ ``gpus`` whose zigzag split of ``seq_len`` is whole (1 on one GPU)."""
    return max(cp for cp in range(1, gpus + 1) if cp == 1 or seq_len % (2 * cp) == 0)


def extend_command(opts: Options, cp: int, tmp: Path) -> list[str]:
    launcher = [sys.executable]
    if cp > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"]
    overrides = [
        "stage=extend_32k", "curriculum.stages=[extend_32k]",  # the first stage: fresh weights, no stage before
        f"run.dir={tmp / 'run'}", f"data.prepared={tmp / 'data'}", f"run.device={opts.device.type}",
        f"parallel.cp={cp}", "parallel.dp=1", f"stage.steps={opts.extend_steps}", "stage.warmup_steps=2",
        "stage.global_batch_size=2", "stage.micro_batch_size=1", "eval.val_every=0", "eval.position_buckets=0",
        "gate.depths=[0.5]", "gate.trials=1", "gate.min_recall=0.0", "logging.log_every=1", "logging.report=false",
        "run.checkpoint_every=100000", *opts.sizes.extend_overrides,
    ]
    return [*launcher, str(REPO / "train.py"), *overrides]


def train_rows(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if "train/loss" in r]


def section_extend_32k(opts: Options, sec: Section) -> None:
    gpus = torch.cuda.device_count() if opts.device.type == "cuda" else 1
    cp = largest_cp(opts.sizes.extend_len, gpus)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        cmd = extend_command(opts, cp, Path(tmp))
        sec.note(f"cp={cp} on {gpus} device(s): " + " ".join(cmd[1:]).replace(str(REPO) + "/", "").replace(tmp, "TMP"))
        code, output = run_process(cmd, opts.timeout_s, capture=True)
        for line in output.strip().splitlines()[-25:]:
            log(f"  | {line}")
        rows = train_rows(Path(tmp) / "run" / "extend_32k" / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows]
    tail = losses[-max(1, len(losses) // 3):]
    decreasing = bool(losses) and statistics.fmean(tail) < losses[0]
    finite = bool(losses) and all(map(math.isfinite, losses))
    steady = rows[2:] or rows  # the first steps pay for warm-up (allocator, kernels)

    def median(key: str) -> Optional[float]:
        values = [r[key] for r in steady if key in r]
        return statistics.median(values) if values else None

    speed, mfu = median("train/tokens_per_s"), median("train/mfu")
    sec.add({"cp": cp, "exit code": "timeout" if code is None else code, "steps logged": len(losses),
             "first loss": f"{losses[0]:.4f}" if losses else "-", "last loss": f"{losses[-1]:.4f}" if losses else "-",
             "tokens/s per GPU (trainer, median from step 3)": f"{speed:,.0f}" if speed else "-",
             "MFU (trainer)": f"{mfu:.1%}" if mfu else "-"},
            {"losses": losses, "metrics": rows}, ok=code == 0 and finite and decreasing)


# ------------------------------------------------------------------ running sections
SECTIONS: dict[str, tuple[str, Callable[[Options, Section], None]]] = {
    "kernels": ("Attention kernels vs float64 (forward, backward; documents)", section_kernels),
    "ring": ("Ring attention over NCCL vs one rank", section_ring),
    "bf16_vs_fp32": ("bf16 autocast vs fp32 training", section_bf16_vs_fp32),
    "throughput": ("Training step throughput and MFU", section_throughput),
    "memory": ("Peak memory vs the planner", section_memory),
    "extend_32k": ("extend_32k through train.py", section_extend_32k),
}


def run_section(name: str, opts: Options) -> Section:
    """Run one section here; an exception becomes the section's error, never the caller's."""
    title, fn = SECTIONS[name]
    sec = Section(name, title)
    log(f"== {name}: {title}")
    started = time.monotonic()
    if opts.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (torch's default, made explicit)
    try:
        fn(opts, sec)
    except Exception as e:  # noqa: BLE001 — one section's failure must not stop the others
        sec.status, sec.error = "error", f"{type(e).__name__}: {e}".splitlines()[0][:500]
        log(f"  ERROR {sec.error}")
        traceback.print_exc(file=sys.stdout)
    sec.seconds = time.monotonic() - started
    log(f"== {name}: {sec.status.upper()} in {sec.seconds:.1f} s")
    return sec


def run_isolated(name: str, opts: Options, child_args: list[str]) -> Section:
    """Run one section in a fresh process (``--section``); a crash or a hang is its error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "section.json"
        cmd = [sys.executable, "-m", "bench.gpu", "--section", name, "--section-json", str(out), *child_args]
        started = time.monotonic()
        code, _ = run_process(cmd, opts.timeout_s + 30)  # the section's own timeouts come first
        if out.is_file():
            return Section(**json.loads(out.read_text()))
    why = "killed at its timeout" if code is None else f"exit {code}"
    sec = Section(name, SECTIONS[name][0], status="error", seconds=time.monotonic() - started,
                  error=f"the section's process ended without a result ({why})")
    log(f"== {name}: ERROR {sec.error}")
    return sec


# ------------------------------------------------------------------ markdown
def heading(device: dict) -> str:
    return f"## GPU node check: {device['name']} (`bench/gpu.py`)"


def markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]


def render(sections: list[Section], device: dict, command: str, seconds: float) -> str:
    about = ", ".join(f"{k} {v}" for k, v in device.items() if k != "name" and v is not None)
    lines = [heading(device), "",
             f"{time.strftime('%Y-%m-%d')}, {device['name']} ({about}); {seconds:.0f} s in all.", "",
             f"    {command}", ""]
    lines += ["| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.status}{': ' + s.error if s.error else ''} | {s.seconds:.0f} |" for s in sections]
    for s in sections:
        lines += ["", f"### {s.title} ({s.name}: {s.status})", ""]
        lines += [f"- {n}" for n in s.notes] + ([""] if s.notes else [])
        lines += [f"Error: `{s.error}`", ""] if s.error else []
        lines += markdown_table(s.rows)
    return "\n".join(lines).rstrip() + "\n"


def splice(results: Path, section: str) -> None:
    """Put ``section`` (starting with its '## ' heading) into ``results``: in place of the
    section with the same heading, else at the end."""
    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    head = section.splitlines()[0]
    lines = text.splitlines()
    if head in lines:
        start = lines.index(head)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = lines[:start] + section.rstrip().splitlines() + ([""] if end < len(lines) else []) + lines[end:]
    else:
        new = lines + [""] + section.rstrip().splitlines()
    results.write_text("\n".join(new) + "\n")


# ------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run, in order")
    ap.add_argument("--out", type=Path, help="folder for gpu.json (every number), gpu.md (the section) and gpu.log")
    ap.add_argument("--results", type=Path, help="markdown file to put the section into (e.g. bench/RESULTS.md)")
    ap.add_argument("--splice", type=Path, help="put this gpu.md into --results and stop (no device needed)")
    ap.add_argument("--train-steps", type=int, default=50, help="bf16_vs_fp32: steps of each run")
    ap.add_argument("--warmup-steps", type=int, default=3, help="throughput: untimed steps first")
    ap.add_argument("--timed-steps", type=int, default=10, help="throughput: timed steps (median)")
    ap.add_argument("--extend-steps", type=int, default=8, help="extend_32k: steps of train.py")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a section (or its train.py) may take")
    ap.add_argument("--budget", type=float, default=570.0,
                    help="seconds for the whole run: a section gets at most what is left, and none starts with under 30")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the tests' run of the logic")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (model=tiny), for tests on the CPU")
    ap.add_argument("--no-isolate", action="store_true", help="run the sections in this process")
    ap.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # a child's one section
    ap.add_argument("--section-json", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child_args(args: argparse.Namespace, timeout_s: float) -> list[str]:
    """The options a section's process needs from ours."""
    out = ["--device", args.device, "--train-steps", str(args.train_steps), "--warmup-steps", str(args.warmup_steps),
           "--timed-steps", str(args.timed_steps), "--extend-steps", str(args.extend_steps), "--timeout", f"{timeout_s:.0f}"]
    return out + (["--tiny"] if args.tiny else []) + (["--out", str(args.out)] if args.out else [])


def run_sections(args: argparse.Namespace, opts: Options) -> list[Section]:
    """Every section asked for, in order, each within what is left of ``--budget``."""
    sections = []
    for name in args.sections:
        left = args.budget - (time.time() - _T0)
        if left < 30:
            sections.append(Section(name, SECTIONS[name][0], status="error", error=f"not run: {left:.0f} s left of --budget"))
            log(f"== {name}: not run, {left:.0f} s left of --budget {args.budget:.0f}")
            continue
        opts.timeout_s = min(args.timeout, left - 30)
        isolated = not args.no_isolate
        sections.append(run_isolated(name, opts, child_args(args, opts.timeout_s)) if isolated else run_section(name, opts))
    return sections


def main(argv: Optional[list[str]] = None) -> int:
    global _LOG_FILE, _T0
    args = parse_args(argv)
    if args.section is None:  # the run starts now (a section's process has the parent's start)
        _T0 = time.time()
    if args.splice:
        if not args.results:
            print("bench.gpu: --splice needs --results FILE", file=sys.stderr)
            return 2
        splice(args.results, args.splice.read_text())
        print(f"bench.gpu: {args.splice} put into {args.results}")
        return 0
    device = torch.device(args.device)
    reason = no_cuda_reason() if device.type == "cuda" else None
    if reason:
        print(f"bench.gpu: no CUDA device: {reason}; nothing run (--device cpu --tiny runs the logic on the CPU)", flush=True)
        return NO_CUDA_EXIT
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        _LOG_FILE = args.out / "gpu.log"
    opts = Options(device, TINY if args.tiny else FULL, args.train_steps, args.warmup_steps, args.timed_steps,
                   args.extend_steps, args.timeout)
    if args.section:  # a child: one section, its result as JSON for the parent
        sec = run_section(args.section, opts)
        args.section_json.write_text(json.dumps(asdict(sec)))
        return 0 if sec.status in ("pass", "skipped") else 1
    about = describe_device(device)
    log(f"bench.gpu on {about['name']}: " + ", ".join(f"{k} {v}" for k, v in about.items() if k != "name"))
    sections = run_sections(args, opts)
    command = " ".join(["python -m bench.gpu", *(sys.argv[1:] if argv is None else argv)])
    section_md = render(sections, about, command, time.time() - _T0)
    if args.out:
        (args.out / "gpu.md").write_text(section_md)
        (args.out / "gpu.json").write_text(json.dumps({"device": about, "sections": [asdict(s) for s in sections]}, indent=1))
    if args.results:
        splice(args.results, section_md)
    log("summary: " + ", ".join(f"{s.name} {s.status}" for s in sections))
    print(section_md, flush=True)
    return 0 if all(s.status in ("pass", "skipped") for s in sections) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
