"""Is a model's routing learned? Figures for a model and for its untrained initialization.

On text the model never saw (promoe's own runtime/ sources), token by token as in
decoding, through promoe's offloaded runtime (``--quant none``):

* usage entropy per MoE layer: the entropy (bits) of how often each expert is chosen;
  log2(E) is perfectly even use (load balancing pushes towards it);
* router entropy per layer: the mean entropy (bits) of each token's router distribution;
  near log2(E) means the router cannot tell experts apart, low means decisive;
* cross-layer recall per layer (Fate): the share of layer i+1's experts found in the
  top-k of layer i+1's router applied to layer i's router input.

The untrained initialization is the same config initialized by transformers with the same
seed. Prints JSON and a Markdown table.

    python scripts/routing_report.py models/tiny-code-moe --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def text_ids(tokenizer, n: int) -> list[list[int]]:
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "runtime").glob("*.py")))
    ids = tokenizer(text)["input_ids"]
    chunk = 256
    return [ids[i : i + chunk] for i in range(0, min(len(ids), n), chunk)]


def report(path: Path, n_tokens: int) -> dict:
    from runtime.loader import LoadOptions, load_model
    from runtime.predictor import record_routing

    with tempfile.TemporaryDirectory() as home:
        lm = load_model(str(path), LoadOptions(quant="none", predictor="none", device="cpu", home=Path(home)))
        try:
            data = record_routing(lm, text_ids(lm.tokenizer, n_tokens), new_tokens=0)
            spec = lm.spec
            out = {"tokens": data.num_tokens, "layers": {}}
            for pos, layer in enumerate(spec.moe_layers):
                counts = torch.bincount(data.experts[layer].reshape(-1), minlength=spec.num_experts).float()
                p = counts / counts.sum()
                usage = -(p[p > 0] * p[p > 0].log2()).sum().item()
                with torch.no_grad():
                    logits, _, _ = spec.router(lm.model, layer)(data.hidden[layer])
                probs = torch.softmax(logits.float(), -1)
                router = -(probs * probs.clamp_min(1e-12).log2()).sum(-1).mean().item()
                row = {"usage_entropy": round(usage, 3), "router_entropy": round(router, 3)}
                if pos + 1 < len(spec.moe_layers):
                    nxt = spec.moe_layers[pos + 1]
                    with torch.no_grad():
                        nlogits, _, _ = spec.router(lm.model, nxt)(data.hidden[layer])
                    pred = nlogits.topk(spec.top_k, -1).indices
                    actual = data.experts[nxt]
                    hit = (pred.unsqueeze(-1) == actual.unsqueeze(-2)).any(-1).sum().item()
                    row["cross_layer_recall"] = round(hit / actual.numel(), 3)
                out["layers"][layer] = row
            out["max_entropy"] = round(math.log2(spec.num_experts), 3)
            return out
        finally:
            lm.close()


def untrained_copy(path: Path, seed: int, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        out
    )  # as the training script
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument(
        "--seed", type=int, default=None, help="init seed (default: the training seed in training_log.json)"
    )
    args = ap.parse_args()
    seed = args.seed
    log = args.model / "training_log.json"
    if seed is None:
        seed = json.loads(log.read_text()).get("settings", {}).get("seed", 0) if log.is_file() else 0
    trained = report(args.model, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        init = report(untrained_copy(args.model, seed, Path(tmp) / "init"), args.tokens)
    print(json.dumps({"trained": trained, "untrained": init, "seed": seed}, indent=1))
    print(
        f"\n{trained['tokens']} tokens of promoe's runtime/ sources; entropies in bits (max {trained['max_entropy']})\n"
    )
    print("| layer | usage entropy, trained | untrained | router entropy, trained | untrained "
          "| cross-layer recall, trained | untrained |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")

    def recall(row: dict) -> str:
        return f"{row['cross_layer_recall']:.3f}" if "cross_layer_recall" in row else "-"

    def mean(rows, key: str) -> float:
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values)

    for layer, t in trained["layers"].items():
        u = init["layers"][layer]
        print(
            f"| {layer} | {t['usage_entropy']:.2f} | {u['usage_entropy']:.2f} | {t['router_entropy']:.2f} | "
            f"{u['router_entropy']:.2f} | {recall(t)} | {recall(u)} |"
        )
    t, u = trained["layers"].values(), init["layers"].values()
    print(
        f"| mean | {mean(t, 'usage_entropy'):.2f} | {mean(u, 'usage_entropy'):.2f} | {mean(t, 'router_entropy'):.2f} | "
        f"{mean(u, 'router_entropy'):.2f} | {mean(t, 'cross_layer_recall'):.3f} | {mean(u, 'cross_layer_recall'):.3f} |"
    )


if __name__ == "__main__":
    main()
