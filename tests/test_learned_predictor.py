"""Learned predictors (ProMoE): recorded on prompts, trained, saved beside the store, used by --prefetch learned."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from promoe_cli.main import app
from runtime.errors import StoreError, UsageError
from runtime.generate import SamplingConfig, generate
from runtime.predictor import (
    PREDICTOR_FILE,
    PREDICTOR_META,
    LayerPredictor,
    _targets,
    load_learned_predictor,
    prompt_room,
    recall_at_k,
    record_routing,
    save_predictors,
    train_predictors,
)
from runtime.store_catalog import predictor_damage
from tests.helpers import budget_for_slots, greedy_ids, load_small, reference_model

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

    def chat_learned():  # a budget of 2 slots a layer: with none the CPU reads experts in place, and
        # with room for every expert nothing is predicted either
        return runner.invoke(app, ["chat", str(path), "--quant", "none", "--prefetch", "learned", "--vram",
                                   str(budget_for_slots(path, "none", 2)), "--prompt", "x"])  # fmt: skip

    mid = len(good) // 2  # inside the tensor data, past the header
    damaged = {"truncated": good[:mid], "4 KB overwritten with 0xFF (NaN weights)": good[:mid] + b"\xff" * 4096
               + good[mid + 4096 :]}  # fmt: skip
    try:  # a damaged predictor file: one line naming it and how to retrain, no traceback
        for what, data in damaged.items():
            saved.write_bytes(data)
            r = chat_learned()
            assert r.exit_code == 5 and "Traceback" not in r.output, (what, r.output)
            assert r.stderr.startswith("error: the learned predictor in") and "is damaged" in r.stderr, what
            assert "promoe train-predictor" in r.stderr, what
    finally:
        saved.write_bytes(good)
    assert chat_learned().exit_code == 0


def test_ctrl_c_while_recording_stops_train_predictor_and_saves_nothing(tiny_model, home, monkeypatch):
    """generate() turns a Ctrl-C into an "interrupted" answer; the recording must stop there,
    not go on to the next prompt with a half-recorded forward."""
    import runtime.offload

    calls = []

    class InterruptedTracer(runtime.offload.RoutingTracer):
        def record(self, *args):
            calls.append(1)
            if len(calls) == 30:  # inside a forward, some prompts in
                raise KeyboardInterrupt
            super().record(*args)

    monkeypatch.setattr(runtime.offload, "RoutingTracer", InterruptedTracer)
    r = runner.invoke(app, ["train-predictor", str(tiny_model("mixtral")), "--quant", "none", "--new-tokens", "4",
                            "--epochs", "1", "--width", "8"])  # fmt: skip
    assert r.exit_code == 130 and "interrupted" in r.stderr and "Traceback" not in r.output, r.output
    assert len(calls) == 30  # nothing was recorded after the interrupt
    assert not list(home.rglob("predictor*"))


def test_prefetch_learned_without_training_explains(tiny_model):
    path = tiny_model("phimoe")
    r = runner.invoke(app, ["chat", str(path), "--prefetch", "learned", "--vram", str(budget_for_slots(path, "int4", 2)),
                            "--prompt", "x"])  # fmt: skip
    assert r.exit_code == 2
    assert r.stderr.startswith("error: no learned predictor") and "train-predictor" in r.stderr
    assert f"promoe train-predictor {path} --prompts FILE" in r.stderr  # the model as given, not MODEL


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


def test_train_predictor_refuses_new_tokens_that_fill_the_context(tiny_model, home, tmp_path):
    """Refused before anything loads: prompts cut to a token or two all record the same sequence,
    and training on them would replace a good predictor."""
    path = str(tiny_model("mixtral"))  # 256 positions
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(f.read_text()[:400] for f in SOURCES[:8]))
    cases = {  # arguments -> the message's start, the hint
        ("--context", "16"): ("--new-tokens 32 leaves no room for a prompt in a context of 16 tokens",
                              "use --new-tokens 7 or less, or --context 41 or more"),
        ("--context", "16", "--new-tokens", "10"): ("--new-tokens 10 leaves room for only 5 prompt tokens in a "
                                                    "context of 16 tokens", "--context 19 or more"),
        ("--new-tokens", "250"): ("--new-tokens 250 leaves room for only 5 prompt tokens in a context of 256 "
                                  "tokens", "use --new-tokens 247 or less"),  # the model's positions, by default
    }  # fmt: skip
    for args, (message, hint) in cases.items():
        r = runner.invoke(app, ["train-predictor", path, "--quant", "none", "--prompts", str(prompts), "--epochs", "1",
                                *args])  # fmt: skip
        assert r.exit_code == 2 and r.stderr.startswith(f"error: {message}"), (args, r.output)
        assert "need at least 8" in r.stderr and hint in r.stderr, (args, r.output)
        assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 2, r.output
    assert not (home / "stores").exists()  # nothing converted, loaded or saved


def test_prompt_room():
    assert prompt_room(16, 7) == 8 and prompt_room(4096, 32) == 4063
    with pytest.raises(UsageError, match="leaves room for only 7 prompt tokens") as e:
        prompt_room(16, 8, positions=256)
    assert e.value.hint == "use --new-tokens 7 or less, or --context 17 or more"
    with pytest.raises(UsageError, match="no room for a prompt") as e:
        prompt_room(512, 5000, positions=512)  # no larger context to suggest
    assert e.value.hint == "use --new-tokens 503 or less"


# -- the saved files ---------------------------------------------------------------------------

SPEC = SimpleNamespace(expert_shape=SimpleNamespace(hidden=16), num_experts=8, moe_layers=[0, 1, 2], top_k=2)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A predictor saved beside a stand-in store (``tmp_path/int4``); returns the store path."""
    torch.manual_seed(0)
    nets = {layer: LayerPredictor(16, 8, 2, 32) for layer in (0, 1)}
    save_predictors(nets, {"lookahead": 2, "width": 32}, tmp_path, {"model": "stand-in"})
    return tmp_path / "int4"


def _overwrite(path: Path, byte: bytes) -> None:
    data = path.read_bytes()
    mid = len(data) // 2
    path.write_bytes(data[:mid] + byte * 4096 + data[mid + 4096 :])


def test_saved_predictor_carries_a_checksum_and_no_temporary_files(saved):
    meta = json.loads((saved.parent / PREDICTOR_META).read_text())
    assert len(meta["xxh3_128"]) == 32 and meta["layers"] == [0, 1]
    assert sorted(p.name for p in saved.parent.iterdir()) == [PREDICTOR_META, PREDICTOR_FILE]
    assert set(load_learned_predictor(saved, SPEC).nets) == {0, 1}
    assert predictor_damage(saved.parent) is None  # `promoe stores` lists it as sound


@pytest.mark.parametrize("byte", [b"\xff", b"\x00"])  # NaN weights; finite zeros only the checksum sees
def test_damaged_predictor_weights_are_refused(saved, byte):
    _overwrite(saved.parent / PREDICTOR_FILE, byte)
    with pytest.raises(StoreError, match=r"is damaged \(its checksum does not match\)") as e:
        load_learned_predictor(saved, SPEC)
    assert "promoe train-predictor" in e.value.hint
    assert predictor_damage(saved.parent) == "its checksum does not match"  # and `promoe stores` says so


def test_predictor_saved_before_checksums_still_loads_unless_its_weights_are_nan(saved):
    meta_path = saved.parent / PREDICTOR_META
    meta = json.loads(meta_path.read_text())
    del meta["xxh3_128"]  # as an older promoe wrote it
    meta_path.write_text(json.dumps(meta))
    assert set(load_learned_predictor(saved, SPEC).nets) == {0, 1}
    _overwrite(saved.parent / PREDICTOR_FILE, b"\xff")
    with pytest.raises(StoreError, match=r"is damaged \(some weights are not finite numbers\)"):
        load_learned_predictor(saved, SPEC)


@pytest.mark.parametrize("lost", [PREDICTOR_META, PREDICTOR_FILE])
def test_a_predictor_missing_one_of_its_two_files_is_damaged_not_untrained(saved, lost):
    """`promoe stores` lists the half that is left as a predictor: say it is damaged (exit 5)."""
    (saved.parent / lost).unlink()
    with pytest.raises(StoreError, match=rf"is damaged \({lost} is missing\)") as e:
        load_learned_predictor(saved, SPEC)
    assert "promoe train-predictor" in e.value.hint
    (saved.parent / (PREDICTOR_FILE if lost == PREDICTOR_META else PREDICTOR_META)).unlink()
    with pytest.raises(UsageError, match="no learned predictor has been trained"):
        load_learned_predictor(saved, SPEC)


def test_saving_again_never_leaves_a_pair_that_loads_wrongly(saved, monkeypatch):
    """Each file is renamed into place: a crash while writing keeps the old predictor; one between
    the two renames leaves new weights beside the old checksum, refused as damaged."""
    torch.manual_seed(1)
    nets = {layer: LayerPredictor(16, 8, 2, 32) for layer in (0, 1)}
    old = load_learned_predictor(saved, SPEC).nets[0].net[0].weight.clone()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):  # half written, then the crash
        real_write_bytes(self, data[: len(data) // 2])
        crash()

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", write_bytes)
        with pytest.raises(OSError):
            save_predictors(nets, {"lookahead": 2, "width": 32}, saved.parent, {"model": "stand-in"})
    assert torch.equal(load_learned_predictor(saved, SPEC).nets[0].net[0].weight, old)

    real_replace = Path.replace

    def replace(self, to):  # the weights renamed into place, then the crash
        return crash() if Path(to).name == PREDICTOR_META else real_replace(self, to)

    with monkeypatch.context() as m:
        m.setattr(Path, "replace", replace)
        with pytest.raises(OSError):
            save_predictors(nets, {"lookahead": 2, "width": 32}, saved.parent, {"model": "stand-in"})
    with pytest.raises(StoreError, match="is damaged"):
        load_learned_predictor(saved, SPEC)
