"""`cotmi bench teach`: is the teacher client ever the bottleneck of a teacher server?

One local OpenAI-compatible server (`transformers serve`, by default with a tiny random causal LM
built here, so that the server is as fast as a server gets on this machine and any client overhead
shows) answers the same chat requests, in turns (A B A B), from:

- ceiling: a minimal request loop: raw HTTP/1.1 on keep-alive connections (asyncio streams), the
  request bodies prebuilt, nothing parsed but the status line and Content-Length;
- cotmi teach: the whole job (`cotmi_ds.teacher.job.run`, in a fresh --out each round: data read,
  template rendered, the `openai` client, the cache, parsing, filtering, publishing).

Both at the same concurrency (cotmi teach's default unless --concurrency), each in its own process.
Printed: completions/s, the ratio to the ceiling (median of the rounds) and each side's own CPU time
per 1,000 requests (the server's share of the cores is what a client's CPU takes away).

Flags (defaults): --model DIR (a causal LM folder; default: the tiny one), --requests 512,
--concurrency 0 (cotmi teach's default), --max_tokens 16, --rounds 2.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# --- the server --------------------------------------------------------------------------------

def build_tiny_causal_lm(folder: Path) -> Path:
    """A randomly initialised two-layer Llama with a BPE tokenizer trained here and a chat template:
    it answers gibberish, quickly."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = ["Q: There are 3 cars and 2 more arrive. A: 3 + 2 = 5. The answer is (3 + 2).",
             "Premise: a dog runs. Hypothesis: an animal moves. So the answer is entailment."] * 20
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", bos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


class TeacherServer:
    """`transformers serve MODEL` on PORT in its own process group, its log read as it is written
    (wait for a line instead of sleeping; count the completions it answered)."""

    def __init__(self, model: Path, port: int, env: dict[str, str] | None = None):
        self.model, self.port, self.lines = model, port, []
        self._seen = threading.Condition()
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model), "--port", str(port),
               "--host", "127.0.0.1", "--device", "cpu"]
        env = {**(env or os.environ), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for(lambda: any("Uvicorn running on" in line for line in self.lines), 120, "start-up")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        with self._seen:
            if not self._seen.wait_for(lambda: predicate() or self.proc.poll() is not None, timeout) or not predicate():
                raise RuntimeError(f"transformers serve: no {what} after {timeout} s:\n{''.join(self.lines[-30:])}")

    def answered(self) -> int:
        """Completions the server answered with 200, from its own access log."""
        with self._seen:
            return sum('"POST /v1/chat/completions HTTP/1.1" 200' in line
                       or '"POST /v1/completions HTTP/1.1" 200' in line for line in self.lines)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


# --- the two sides -----------------------------------------------------------------------------

def _questions(folder: Path, n: int) -> Path:
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps({"input": f"What is {i} plus {2 * i}?", "label": str(3 * i)}) + "\n"
                            for i in range(n)))
    return path


def _teach_flags(data: Path, out: Path, url: str, side: dict) -> dict:
    flags = {"dataset": str(data), "task": "numeric", "out": str(out), "base_url": url,
             "max_tokens": side["max_tokens"], "filter": "keep_all"}
    return {**flags, "concurrency": side["concurrency"]} if side["concurrency"] else flags


def _side(side: dict) -> dict:
    """One measurement in this process: {"wall_s", "cpu_s"} for side["requests"] requests."""
    from cotmi_ds.teacher.job import plan_requests, prepare, run
    from cotmi_ds.teacher.options import parse_teach_flags

    work = Path(tempfile.mkdtemp(prefix="bench-teach-"))
    data = _questions(work, side["requests"])
    opts = parse_teach_flags(_teach_flags(data, work / "out", side["url"], side))
    if side["kind"] == "tool":
        import datasets  # noqa: F401  (imports are not what is measured)
        import openai  # noqa: F401

        t0, c0 = time.perf_counter(), time.process_time()
        run(opts)
        return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    source, template = prepare(opts)
    plan = plan_requests(opts, source, template, side["model"])
    bodies = [json.dumps({"model": side["model"], "messages": r.body, **{k: v for k, v in plan.settings.items()
                                                                          if k not in ("model", "api")}}).encode()
              for r in plan.requests]
    t0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(_minimal_loop(side["url"], bodies, opts.concurrency))
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


async def _minimal_loop(url: str, bodies: list[bytes], concurrency: int) -> None:
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1].rstrip("/") + "/chat/completions"
    todo = list(reversed(bodies))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while todo:
            body = todo.pop()
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


# --- the command -------------------------------------------------------------------------------

def run(**flags) -> None:
    from benchmarks.options import TeachBenchOptions
    from cotmi_ds.flags import parse_flags
    from cotmi_ds.distributed import reserved_port
    from cotmi_ds.teacher.options import TeachOptions

    opts = parse_flags(TeachBenchOptions, flags, "cotmi bench teach")
    concurrency = opts.concurrency or TeachOptions.concurrency
    with tempfile.TemporaryDirectory(prefix="bench-teach-") as tmp:
        model = Path(opts.model) if opts.model else build_tiny_causal_lm(Path(tmp) / "tiny-lm")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with reserved_port() as port:
            server = TeacherServer(model, port, env)
        try:
            side = {"url": server.url, "model": str(model), "requests": opts.requests,
                    "concurrency": opts.concurrency, "max_tokens": opts.max_tokens}
            print(f"server: transformers serve {model} (CPU); {opts.requests} chat requests per side, "
                  f"concurrency {concurrency}, max_tokens {opts.max_tokens}; sides alternate, {opts.rounds} rounds",
                  flush=True)
            results: dict[str, list[dict]] = {"ceiling": [], "tool": []}
            for r in range(opts.rounds):
                for kind in ("ceiling", "tool"):
                    proc = subprocess.run([sys.executable, "-m", "benchmarks.teach_bench",
                                           json.dumps({**side, "kind": kind})], capture_output=True, text=True,
                                          env=env, cwd=REPO)
                    if proc.returncode:
                        raise RuntimeError(f"{kind} side failed:\n{proc.stderr[-3000:]}")
                    m = json.loads(proc.stdout.strip().splitlines()[-1])
                    results[kind].append(m)
                    print(f"round {r + 1} {kind:<12} {opts.requests / m['wall_s']:8.1f} completions/s   "
                          f"client CPU {1000 * m['cpu_s'] / opts.requests:6.2f} s per 1,000 requests",
                          flush=True)
        finally:
            server.kill()
    print(summary(results, opts.requests), flush=True)


def summary(results: dict[str, list[dict]], requests: int) -> str:
    rate = {k: statistics.median(requests / m["wall_s"] for m in v) for k, v in results.items()}
    cpu = {k: statistics.median(1000 * m["cpu_s"] / requests for m in v) for k, v in results.items()}
    ratios = [requests / t["wall_s"] / (requests / c["wall_s"]) for c, t in zip(results["ceiling"], results["tool"])]
    return "\n".join([
        f"{'':<14}{'completions/s':>15}{'client CPU s / 1,000 req':>28}",
        f"{'ceiling':<14}{rate['ceiling']:>15.1f}{cpu['ceiling']:>28.2f}",
        f"{'cotmi teach':<14}{rate['tool']:>15.1f}{cpu['tool']:>28.2f}",
        f"cotmi teach / ceiling: {rate['tool'] / rate['ceiling']:.3f}x (per round: "
        + ", ".join(f"{x:.3f}" for x in ratios) + ")",
    ])


if __name__ == "__main__":
    print(json.dumps(_side(json.loads(sys.argv[1]))))
