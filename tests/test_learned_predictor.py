"""Learned predictors (ProMoE): recorded on prompts, trained, saved beside the store, used by --prefetch learned."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from promoe_cli.main import app
from runtime.generate import SamplingConfig, generate
from runtime.predictor import _targets, recall_at_k, record_routing, train_predictors
from tests.helpers import greedy_ids, load_small, reference_model

runner = CliRunner()
SOURCES = sorted((Path(__file__).resolve().parents[1] / "runtime").glob("*.py"))


def code_prompts(tokenizer, files, n=3, length=96):
    out = []
    for f in files:
        ids = tokenizer(f.read_text())["input_ids"]
        out += [ids[i : i + length] for i in range(0, min(len(ids), n * length), length)]
    return out


def test_learned_predictor_beats_chance_on_held_out_text(tiny_model):
    lm = load_small(tiny_model("olmoe"), quant="none", slots_per_layer=8, predictor="none")
    try:
        train = record_routing(lm, code_prompts(lm.tokenizer, SOURCES[::2]), new_tokens=8)
        test = record_routing(lm, code_prompts(lm.tokenizer, SOURCES[1::2]), new_tokens=8)
        spec = lm.spec
        nets, meta = train_predictors(
            train, spec.moe_layers, spec.num_experts, spec.top_k, lookahead=2, epochs=15
        )
        assert set(nets) == set(spec.moe_layers[:-1]) and meta["tokens"] == train.num_tokens
        chance = spec.top_k / spec.num_experts
        for pos, layer in enumerate(spec.moe_layers[:-1]):
            y = _targets(test, spec.moe_layers, pos, 2, spec.num_experts)
            with torch.no_grad():
                rec = recall_at_k(nets[layer](test.hidden[layer]), y, spec.top_k)
            assert rec[0] > chance + 0.3, (layer, rec)  # one layer ahead
    finally:
        lm.close()


def test_train_predictor_command_then_prefetch_learned(tiny_model, tmp_path):
    path = tiny_model("mixtral")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(f.read_text()[:800] for f in SOURCES[:6]))
    r = runner.invoke(app, ["train-predictor", str(path), "--prompts", str(prompts), "--quant", "none",
                            "--epochs", "5", "--new-tokens", "8", "--lookahead", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "recall@2" in r.stdout and "+2 layers" in r.stdout

    ref = reference_model(path)
    prompt = [5, 17, 42, 99, 7, 128]
    want = greedy_ids(ref, prompt, 16)
    lm = load_small(path, quant="none", slots_per_layer=2, predictor="learned")
    try:
        done = generate(lm, prompt, SamplingConfig(max_new_tokens=16, temperature=0, ignore_eos=True))
        assert done.token_ids == want  # prefetching never changes the output
        st = lm.cache.stats.total()
        assert st.prefetches > 0 and st.pred_tp > 0
        saved = lm.store.path.parent / "predictor.safetensors"
        assert saved.is_file()
    finally:
        lm.close()
    good = saved.read_bytes()
    try:  # a truncated predictor file: one line naming it and how to retrain, no traceback
        saved.write_bytes(good[: len(good) // 2])
        r = runner.invoke(
            app,
            [
                "chat",
                str(path),
                "--quant",
                "none",
                "--prefetch",
                "learned",
                "--link-bandwidth",
                "1GB/s",
                "--prompt",
                "x",
            ],
        )  # a link: with no budget and no link, the CPU reads experts in place and predicts nothing
        assert r.exit_code == 5 and r.stderr.startswith("error: the learned predictor in"), r.output
        assert "promoe train-predictor" in r.stderr and "Traceback" not in r.output
    finally:
        saved.write_bytes(good)


def test_prefetch_learned_without_training_explains(tiny_model):
    r = runner.invoke(app, ["chat", str(tiny_model("phimoe")), "--prefetch", "learned", "--link-bandwidth", "1GB/s",
                            "--prompt", "x"])  # fmt: skip
    assert r.exit_code == 2
    assert r.stderr.startswith("error: no learned predictor") and "train-predictor" in r.stderr


def test_train_predictor_refuses_what_it_cannot_learn_from(tiny_model, tmp_path):
    path = str(tiny_model("mixtral"))  # 4 MoE layers
    r = runner.invoke(app, ["train-predictor", path, "--quant", "none", "--lookahead", "4", "--epochs", "1"])
    assert r.exit_code == 2 and "--lookahead 4 looks past the last layer" in r.stderr, r.output
    one = tmp_path / "one.txt"
    one.write_text("hi\n")
    r = runner.invoke(
        app, ["train-predictor", path, "--quant", "none", "--prompts", str(one), "--new-tokens", "2"]
    )
    assert r.exit_code == 2 and "a predictor needs at least 64" in r.stderr, r.output
    r = runner.invoke(app, ["train-predictor", path, "--prompts", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.stderr, r.output
