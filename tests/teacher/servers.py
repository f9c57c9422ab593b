"""Real HTTP servers for the teacher tests: `transformers serve` with a tiny locally built causal LM,
and a loopback proxy in front of it that counts the requests it relays and can answer errors, hold
requests or delay them. Nothing here mocks the `openai` client: it talks HTTP to these."""
from __future__ import annotations

import http.client
import http.server
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from tests.conftest import child_env, kill_group

ANSWERED = re.compile(r'"POST /v1/(chat/)?completions HTTP/1.1" 200')


def build_tiny_causal_lm(folder: Path) -> Path:
    """A randomly initialised two-layer Llama with a BPE tokenizer trained here and a chat template:
    it answers gibberish, quickly, which is all the plumbing needs."""
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
    """`transformers serve MODEL` on PORT in its own process group; its log is read as it is written,
    so a test can wait for a line (start-up, the N-th answered request) instead of sleeping."""

    def __init__(self, model: Path, port: int):
        self.model, self.port, self.lines = model, port, []
        self._seen = threading.Condition()
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model), "--port", str(port),
               "--host", "127.0.0.1", "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=child_env(HF_HUB_OFFLINE="1"))
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
                raise AssertionError(f"transformers serve: no {what} after {timeout} s:\n{''.join(self.lines[-30:])}")

    def answered(self) -> int:
        """Completions the server answered with 200, from its own access log."""
        with self._seen:
            return sum(bool(ANSWERED.search(line)) for line in self.lines)

    def kill(self) -> None:
        kill_group(self.proc)


class FaultProxy:
    """A loopback HTTP proxy in front of a server. Counts the completion requests it relays (by
    request body, so a repeat shows), answers the next ones from ``script`` instead (``(status,
    headers)``), and with ``hold_after=N`` answers N requests then holds every later one until
    ``release()`` (``held`` is set when the first is held)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.split("//", 1)[1].split("/", 1)[0]
        self.script: list[tuple[int, dict]] = []
        self.bodies: Counter = Counter()
        self.log: list[tuple[float, int]] = []       # (time, status) of every completion request
        self.auth: set[str] = set()
        self.hold_after: int | None = None
        self.held, self._release = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._relay(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.auth.add(self.headers.get("Authorization", ""))
                with proxy._lock:
                    fault = proxy.script.pop(0) if proxy.script else None
                    relayed = sum(proxy.bodies.values())
                    hold = proxy.hold_after is not None and relayed >= proxy.hold_after and fault is None
                if hold:
                    proxy.held.set()
                    proxy._release.wait()
                if fault is not None:
                    status, headers = fault
                    proxy.log.append((time.monotonic(), status))
                    payload = json.dumps({"error": {"message": f"injected {status}", "type": "test"}}).encode()
                    self.send_response(status)
                    for k, v in {**headers, "Content-Type": "application/json",
                                 "Content-Length": str(len(payload))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                status = self._relay(body)
                with proxy._lock:
                    proxy.log.append((time.monotonic(), status))
                    if status == 200:
                        proxy.bodies[body] += 1

            def _relay(self, body):
                conn = http.client.HTTPConnection(proxy.upstream, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()
                return resp.status

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)  # a killed client is expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def relayed(self) -> int:
        return sum(self.bodies.values())

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
