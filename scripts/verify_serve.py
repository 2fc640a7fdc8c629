"""Check `moa serve` with the official OpenAI client on an MoA trained on unseen domains
(the checkpoint written by scripts/verify_moa.py).

    python scripts/verify_serve.py --moa runs/verify_moa/moa --data runs/verify_moa/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moa", default="runs/verify_moa/moa")
    ap.add_argument("--data", default="runs/verify_moa/heldout.jsonl")
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moa.cli", "serve", "--moa", args.moa, "--port", str(port),
                             "--max-batch-size", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)
        rows = [json.loads(l) for l in open(args.data)]
        rows = [rows[i * len(rows) // args.n] for i in range(args.n)]

        def ask(r):
            resp = client.chat.completions.create(model="moa", temperature=0, max_tokens=24,
                                                  messages=[{"role": "user", "content": r["prompt"]}])
            return resp.model_extra["moa"]["domain"], resp.choices[0].message.content

        t = time.time()
        with ThreadPoolExecutor(args.n) as pool:
            answers = list(pool.map(ask, rows))
        wall = time.time() - t
        routed_right = sum(d == r["domain"] for (d, _), r in zip(answers, rows)) / len(rows)
        first = rows[0]
        msg = [{"role": "user", "content": first["prompt"]}]
        plain = client.chat.completions.create(model="moa", temperature=0, max_tokens=24, messages=msg)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="moa", temperature=0, max_tokens=24, messages=msg, stream=True) if c.choices)
        other = next(d for d in sorted({r["domain"] for r in rows}) if d != first["domain"])
        forced = client.chat.completions.create(model=f"moa:{other}", temperature=0, max_tokens=8, messages=msg)
        bad = {
            "invalid JSON": httpx.post(f"{url}/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}),
            "missing messages": httpx.post(f"{url}/v1/chat/completions", json={"model": "moa"}),
            "wrong type": httpx.post(f"{url}/v1/chat/completions", json={"model": "moa", "messages": "hi"}),
            "unknown model": httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-9", "messages": msg}),
            "too many tokens": httpx.post(f"{url}/v1/chat/completions", json={"model": "moa", "messages": msg, "max_tokens": 10**6}),
            "empty messages": httpx.post(f"{url}/v1/chat/completions", json={"model": "moa", "messages": []}),
        }
        result = {
            "requests": len(rows), "answered": sum(bool(a[1] is not None) for a in answers),
            "routed_right": routed_right, "wall_s": round(wall, 1),
            "streaming_equals_non_streaming": streamed == plain.choices[0].message.content,
            "forced_domain": forced.model_extra["moa"]["domain"], "forced_requested": other,
            "malformed_status": {k: v.status_code for k, v in bad.items()},
            "sample": answers[:3],
        }
        print(json.dumps(result, indent=1))
        ok = (result["answered"] == len(rows) and routed_right >= 0.95 and result["streaming_equals_non_streaming"]
              and result["forced_domain"] == other and all(400 <= s < 500 for s in result["malformed_status"].values()))
        return 0 if ok else 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
